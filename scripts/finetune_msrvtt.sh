#!/usr/bin/env bash
# The release's MSR-VTT retrieval fine-tuning recipe: 1 node x 8 GPUs, 8 clips per GPU (global batch 64), base lr
# 3e-4 (scaled by global batch / 256), 100 epochs, 5 warm-up epochs, AdamW (0.9, 0.999), weight decay 0.05,
# drop path 0.1, 16 frames with stride 4 at 224 px, 3 x 3 test views; both branches start from one SimVTP
# pre-training checkpoint. Differences from the release, on purpose: the model is selected on a validation set
# (VAL_DATA_PATH, else 5% of the training videos held out), never on test; layer decay 0.75 now really applies
# (the release's was a no-op, i.e. 1.0: set LAYER_DECAY=1.0 to match it).
#
# Usage:
#   bash scripts/finetune_msrvtt.sh TRAIN_ANNO TEST_ANNO DATA_ROOT PRETRAIN_CKPT OUTPUT_DIR [extra flags...]
#   TRAIN_ANNO: MSR-VTT 9k training list (e.g. Singularity msrvtt_train9k.json, several captions per video)
#   TEST_ANNO:  MSR-VTT 1k-A test list (e.g. MSRVTT_JSFUSION_test.csv)
# Under SLURM, submit scripts/slurm_finetune.sbatch instead. Relative paths are taken from the folder you run it in.
# Environment (defaults): GPUS_PER_NODE=8 NNODES=1 NODE_RANK=0 MASTER_ADDR (required with NNODES > 1)
#   MASTER_PORT=29501 (with SLURM_JOB_ID: derived from it) VAL_DATA_PATH (validation annotations, optional)
#   LAYER_DECAY=0.75 DRY_RUN=1 prints the command. The launch is scripts/launcher.sh, shared by the recipes.
# Runs in the project's .venv (made or updated by scripts/setup_env.sh on first use, as demo.sh does; with several
# nodes run `bash scripts/setup_env.sh` once before starting them) - nothing needs to be activated, no torchrun on
# PATH. PY=/path/to/python runs it in an environment you manage instead (e.g. a cluster's conda env).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"

if [ $# -lt 5 ]; then
  echo "usage: bash scripts/finetune_msrvtt.sh TRAIN_ANNO TEST_ANNO DATA_ROOT PRETRAIN_CKPT OUTPUT_DIR [flags]" >&2
  echo "  (runs in .venv via scripts/setup_env.sh; PY=/path/to/python for another environment)" >&2
  exit 2
fi
TRAIN_ANNO="$1"; TEST_ANNO="$2"; DATA_ROOT="$3"; PRETRAIN_CKPT="$4"; OUTPUT_DIR="$5"
shift 5

launcher_paths TRAIN_ANNO TEST_ANNO DATA_ROOT PRETRAIN_CKPT OUTPUT_DIR VAL_DATA_PATH
launcher_command run_simvtp_finetuning.py 1 29501
cmd=("${LAUNCH[@]}"
     --model simvtp_dual_base_patch16 --data_set MSRVTT
     --data_path "$TRAIN_ANNO" --test_data_path "$TEST_ANNO" --data_root "$DATA_ROOT"
     --finetune "$PRETRAIN_CKPT" --output_dir "$OUTPUT_DIR" --log_dir "$OUTPUT_DIR/tb"
     --batch_size 8 --num_sample 1 --input_size 224 --short_side_size 224
     --num_frames 16 --sampling_rate 4 --save_ckpt_freq 10
     --opt adamw --lr 3e-4 --min_lr 1e-6 --warmup_lr 1e-6 --opt_betas 0.9 0.999 --weight_decay 0.05
     --layer_decay "${LAYER_DECAY:-0.75}" --drop_path 0.1 --epochs 100 --warmup_epochs 5 --temperature 0.05
     --dist_eval --test_num_segment 3 --test_num_crop 3 --num_workers 10 --device cuda --precision auto)
if [ -n "${VAL_DATA_PATH:-}" ]; then
  cmd+=(--val_data_path "$VAL_DATA_PATH")
else
  cmd+=(--val_fraction 0.05)
fi
cmd+=("$@")

launcher_run "${cmd[@]}"
