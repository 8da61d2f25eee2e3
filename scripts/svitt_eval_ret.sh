#!/usr/bin/env bash
# SViTT's retrieval evaluation recipe (the release's evaluation of ret_<dataset>.yaml, in our flags): a SViTT
# checkpoint (pre-trained: zero-shot; or fine-tuned) tested with `--only_test` on the dataset's test split: 12 test
# frames in 3 clips of 4 (middle frames), contrastive similarities averaged over clips, then each text's top 128
# videos and each video's top 128 texts re-scored by the model's own matching head (logits log-sum-exp'd over
# clips); both rankings are reported. Settings per dataset: scripts/svitt_ret_datasets.sh.
#
# Usage (run once per node):
#   bash scripts/svitt_eval_ret.sh DATASET CKPT OUTPUT_DIR [extra flags...]
#   DATASET: msrvtt | didemo | charades | ssv2_label | ssv2_template | anet
# Environment as scripts/svitt_train_ret.sh (DATA_DIR=data, NNODES, GPUS_PER_NODE=8, MASTER_ADDR, MASTER_PORT=29505,
# DRY_RUN=1, PY). Under SLURM: `LAUNCHER=srun bash scripts/svitt_eval_ret.sh ...` in an sbatch file with one task
# per GPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"
source "$(dirname "${BASH_SOURCE[0]}")/svitt_ret_datasets.sh"

if [ $# -lt 3 ]; then
  echo "usage: bash scripts/svitt_eval_ret.sh DATASET CKPT OUTPUT_DIR [flags]  (DATASET: $SVITT_RET_DATASETS)" >&2
  echo "  (runs in .venv via scripts/setup_env.sh; PY=/path/to/python for another environment)" >&2
  exit 2
fi
DATASET="$1"; CKPT="$2"; OUTPUT_DIR="$3"
shift 3
DATA_DIR="${DATA_DIR:-data}"
launcher_paths DATA_DIR CKPT OUTPUT_DIR
svitt_ret_dataset "$DATASET"
if [ -z "${DRY_RUN:-}" ]; then
  [ -f "$CKPT" ] || launcher_fail "checkpoint not found: $CKPT"
  [ -f "$TEST_ANNO" ] || launcher_fail "annotation file not found: $TEST_ANNO (DATA_DIR=$DATA_DIR: the Singularity layout, see scripts/svitt_ret_datasets.sh)"
fi

launcher_command run_simvtp_finetuning.py 1 29505
cmd=("${LAUNCH[@]}" "${SVITT_RET_MODEL[@]}" "${DATASET_FLAGS[@]}" --only_test
     --test_data_path "$TEST_ANNO" --data_root "$VIDEO_ROOT" --finetune "$CKPT" --output_dir "$OUTPUT_DIR"
     --batch_size 32)
cmd+=("$@")

launcher_run "${cmd[@]}"
