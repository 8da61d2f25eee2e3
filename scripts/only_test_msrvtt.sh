#!/usr/bin/env bash
# The release's MSR-VTT test-only run: the given fine-tuned weights, once, on the 1k-A test set with 15 clips x
# 3 crops per video (features averaged over the 45 views), text-to-video and video-to-text metrics, split over
# 1 node x 8 GPUs (--dist_eval). Writes OUTPUT_DIR/test_metrics.json and test_per_query.jsonl. Never resumes
# anything found in OUTPUT_DIR over the given weights.
#
# Usage:
#   bash scripts/only_test_msrvtt.sh TEST_ANNO DATA_ROOT FINETUNED_CKPT OUTPUT_DIR [extra flags...]
#   e.g. add --rerank_k 16 --rerank_ckpt PRETRAIN_CKPT to re-rank each query's top 16 with the matching head.
# Relative paths are taken from the folder you run it in.
# Environment (defaults): GPUS_PER_NODE=8 NNODES=1 NODE_RANK=0 MASTER_ADDR (required with NNODES > 1)
#   MASTER_PORT=29502 (with SLURM_JOB_ID: derived from it) DRY_RUN=1 prints the command. The launch is
#   scripts/launcher.sh, shared by the recipes.
# Runs in the project's .venv (made or updated by scripts/setup_env.sh on first use, as demo.sh does; with several
# nodes run `bash scripts/setup_env.sh` once before starting them) - nothing needs to be activated, no torchrun on
# PATH. PY=/path/to/python runs it in an environment you manage instead (e.g. a cluster's conda env).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"

if [ $# -lt 4 ]; then
  echo "usage: bash scripts/only_test_msrvtt.sh TEST_ANNO DATA_ROOT FINETUNED_CKPT OUTPUT_DIR [flags]" >&2
  echo "  (runs in .venv via scripts/setup_env.sh; PY=/path/to/python for another environment)" >&2
  exit 2
fi
TEST_ANNO="$1"; DATA_ROOT="$2"; CKPT="$3"; OUTPUT_DIR="$4"
shift 4

launcher_paths TEST_ANNO DATA_ROOT CKPT OUTPUT_DIR
launcher_command run_simvtp_finetuning.py 1 29502
cmd=("${LAUNCH[@]}"
     --only_test
     --model simvtp_dual_base_patch16 --data_set MSRVTT
     --test_data_path "$TEST_ANNO" --data_root "$DATA_ROOT" --finetune "$CKPT" --output_dir "$OUTPUT_DIR"
     --batch_size 8 --num_sample 1 --input_size 224 --short_side_size 224 --num_frames 16 --sampling_rate 4
     --dist_eval --test_num_segment 15 --test_num_crop 3 --num_workers 10 --device cuda --precision auto)
cmd+=("$@")

launcher_run "${cmd[@]}"
