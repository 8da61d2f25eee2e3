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

svitt_ret_arguments svitt_eval_ret.sh "$@"
shift 3

launcher_command run_simvtp_finetuning.py 1 29505
cmd=("${LAUNCH[@]}" "${SVITT_RET_MODEL[@]}" "${DATASET_FLAGS[@]}" --only_test
     --test_data_path "$TEST_ANNO" --data_root "$VIDEO_ROOT" --finetune "$CKPT" --output_dir "$OUTPUT_DIR"
     --batch_size 32)
cmd+=("$@")

launcher_run "${cmd[@]}"
