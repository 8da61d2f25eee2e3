#!/usr/bin/env bash
# SViTT's retrieval fine-tuning recipe (the release's ret_<dataset>.yaml, in our flags): from a SViTT checkpoint
# (pre-training or an earlier fine-tuning), ITC (same-video positives; same-caption for SSv2) + ITM with hard
# negatives, no MLM; AdamW lr 1e-5 (our --lr is per 256 clips: 8 GPUs x 32 = 256, so 1e-5 as the release), weight
# decay 0.02, cosine over 10 epochs with no warm-up down to 10% of the peak; train 4 frames (one random frame per
# segment), test 12 frames in 3 clips with lse over clips and the top 128 re-ranked. Settings per dataset:
# scripts/svitt_ret_datasets.sh. Difference from the release, on purpose: the model is selected on a validation
# split (DiDeMo's val file; elsewhere 5% of the training videos held out), never on the test split.
#
# Usage (run once per node):
#   bash scripts/svitt_train_ret.sh DATASET CKPT OUTPUT_DIR [extra flags...]
#   DATASET: msrvtt | didemo | charades | ssv2_label | ssv2_template | anet
# Relative paths are taken from the folder you run it in. Environment (defaults): DATA_DIR=data (the Singularity
# layout: DATA_DIR/anno_downstream/*.json, DATA_DIR/<dataset>_videos/), NNODES=1 GPUS_PER_NODE=8 NODE_RANK=0
# MASTER_ADDR (required with NNODES > 1) MASTER_PORT=29504 (with SLURM_JOB_ID: derived from it), DRY_RUN=1 prints
# the command, PY=/path/to/python: another environment.
# Under SLURM: in an sbatch file with one task per GPU, run `LAUNCHER=srun bash scripts/svitt_train_ret.sh ...`
# (as scripts/slurm_finetune.sbatch does for SimVTP); the tasks read rank, address and port from SLURM.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"
source "$(dirname "${BASH_SOURCE[0]}")/svitt_ret_datasets.sh"

svitt_ret_arguments svitt_train_ret.sh "$@"
shift 3

launcher_command run_simvtp_finetuning.py 1 29504
cmd=("${LAUNCH[@]}" "${SVITT_RET_MODEL[@]}" "${DATASET_FLAGS[@]}"
     --data_path "$TRAIN_ANNO" --test_data_path "$TEST_ANNO" --data_root "$VIDEO_ROOT"
     --finetune "$CKPT" --output_dir "$OUTPUT_DIR" --log_dir "$OUTPUT_DIR/tb"
     --batch_size 32 --opt adamw --opt_betas 0.9 0.999 --lr 1e-5 --min_lr 1e-6 --warmup_epochs 0 --epochs 10
     --weight_decay 0.02 --layer_decay 1.0 --drop_path 0.1 --vtm_negatives hard --w_itc 1 --w_itm 1
     --save_ckpt_freq 1)
if [ -n "$VAL_ANNO" ]; then
  cmd+=(--val_data_path "$VAL_ANNO")
else
  cmd+=(--val_fraction 0.05)
fi
cmd+=("$@")

launcher_run "${cmd[@]}"
