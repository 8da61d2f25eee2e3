#!/usr/bin/env bash
# SViTT's video QA fine-tuning recipe (the release's qa_<dataset>.yaml, in our flags): from a SViTT checkpoint
# (pre-training, retrieval or QA), the question through the text tower with cross-attention to the video in its
# fusion layers, an answer decoder started from those fusion layers, teacher forcing on the answers; AdamW lr 1e-5
# (our --lr is per 256 clips: 8 GPUs x 32 = 256, so 1e-5 as the release), weight decay 0.02, cosine down to 10% of
# the peak after a warm-up of half an epoch (AGQA: a quarter), 10 epochs (AGQA: 5); train 8 frames (one random
# frame per segment) of 224 px with edge sparsity (local 1, 3 random blocks of 56), node sparsity (keep 0.6 after
# vision layers 3, 6, 9) and text-guided selection (keep 0.5 after the second fusion layer, text layer 10); test 24
# frames as 3 clips of 8 (segment middles) whose answer scores are log-sum-exp'd, each question's top 128 answers
# of the list re-scored by their full likelihood. Questions are cleaned as the release's (lower case, no
# punctuation). Difference from the release, on purpose: AGQA ships no validation file apart from its test file,
# so its model is selected on 5% of the training videos held out, never on the test split.
# Every parameter is fine-tuned, as the release does. --freeze PREFIX (ours, off) keeps a pre-trained part fixed: the
# demo's SimVTP QA freezes its encoder because one QA epoch of the tiny model erases the motion its pre-training put
# in (docs/matching_heads.md); whether that happens at the release's lr and length has not been measured here.
#
# Usage (run once per node):
#   bash scripts/svitt_train_qa.sh DATASET CKPT OUTPUT_DIR [extra flags...]
#   DATASET: msrvtt | anet | agqa | synthetic
# Files follow the Singularity / SViTT layout under DATA_DIR (default: data): DATA_DIR/anno_downstream/
# <dataset>_qa_{train,val,test}.json (AGQA: agqa_{train,test}_balanced.json) + <dataset>_qa_answer_list.json, and
# the videos in DATA_DIR/msrvtt_videos, DATA_DIR/anet_videos, DATA_DIR/charades_videos. synthetic is the demo's
# set (DATA_DIR/synthetic_2k_64, made by scripts/demo.sh) with the tiny model on this CPU: a smoke test of the recipe.
# Environment (defaults): NNODES=1 GPUS_PER_NODE=8 NODE_RANK=0 MASTER_ADDR (required with NNODES > 1)
# MASTER_PORT=29506 (with SLURM_JOB_ID: derived from it), DRY_RUN=1 prints the command, PY=/path/to/python;
# LAUNCHER=srun under SLURM (one task per GPU, as scripts/slurm_finetune.sbatch starts them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"

DATASETS="msrvtt anet agqa synthetic"
if [ $# -lt 3 ]; then
  echo "usage: bash scripts/svitt_train_qa.sh DATASET CKPT OUTPUT_DIR [flags]  (DATASET: $DATASETS)" >&2
  echo "  (runs in .venv via scripts/setup_env.sh; PY=/path/to/python for another environment)" >&2
  exit 2
fi
DATASET="$1"; CKPT="$2"; OUTPUT_DIR="$3"
shift 3
DATA_DIR="${DATA_DIR:-data}"
launcher_paths DATA_DIR CKPT OUTPUT_DIR
ANNO="$DATA_DIR/anno_downstream"

MODEL=(--model svitt_qa_base_patch16_224 --sparse_local_attn 1 --sparse_random_attn 3 --attn_block_size 56
       --token_keep_rate 0.6 --token_drop_loc 3 6 9 --token_keep_strategy cls_attn
       --fusion_keep_rate 0.5 --fusion_drop_loc 10 --fusion_keep_strategy cls_attn
       --num_frames 8 --sample_type rand --sample_type_test middle --input_size 224 --short_side_size 224
       --num_frames_test 24 --eval_frame_ensemble lse --test_num_segment 1 --test_num_crop 1 --k_test 128
       --max_q_len 25 --max_a_len 5 --clean_text --dist_eval --device cuda --precision auto --num_workers 10)
EPOCHS=10; WARMUP=0.5
case "$DATASET" in
  msrvtt | anet)
    VIDEO_ROOT="$DATA_DIR/${DATASET}_videos"
    FILES=(--data_path "$ANNO/${DATASET}_qa_train.json" --val_data_path "$ANNO/${DATASET}_qa_val.json"
           --test_data_path "$ANNO/${DATASET}_qa_test.json" --answer_list "$ANNO/${DATASET}_qa_answer_list.json") ;;
  agqa)
    VIDEO_ROOT="$DATA_DIR/charades_videos"
    FILES=(--data_path "$ANNO/agqa_train_balanced.json" --val_fraction 0.05
           --test_data_path "$ANNO/agqa_test_balanced.json" --answer_list "$ANNO/agqa_answer_list.json")
    EPOCHS=5; WARMUP=0.25 ;;
  synthetic)  # the tiny model on CPU, the demo's clips (8 frames of 64 px), a larger lr for its few hundred steps
    VIDEO_ROOT="$DATA_DIR/synthetic_2k_64"
    ANNO="$VIDEO_ROOT/annotations"
    FILES=(--data_path "$ANNO/qa_train.json" --val_data_path "$ANNO/qa_val.json"
           --test_data_path "$ANNO/qa_test.json" --answer_list "$ANNO/qa_answer_list.json")
    MODEL=(--model svitt_qa_tiny_patch16 --sparse_local_attn 1 --sparse_random_attn 1 --attn_block_size 32
           --token_keep_rate 0.6 --token_drop_loc 1 2 --num_frames 8 --sample_type rand --input_size 64
           --short_side_size 64 --num_frames_test 8 --k_test 128 --max_q_len 25 --max_a_len 5
           --device cpu --precision auto --num_workers 0)
    OPTIM=(--batch_size 16 --lr 1e-2 --min_lr 1e-6 --weight_decay 0.02 --layer_decay 1.0 --drop_path 0.1
           --epochs 1 --warmup_steps 60 --keep_last 1)
    GPUS_PER_NODE="${GPUS_PER_NODE:-1}" ;;
  *)
    launcher_fail "unknown DATASET '$DATASET': use one of $DATASETS" ;;
esac
if [ -z "${OPTIM+set}" ]; then
  OPTIM=(--batch_size 32 --opt adamw --opt_betas 0.9 0.999 --lr 1e-5 --min_lr 1e-6 --weight_decay 0.02
         --layer_decay 1.0 --drop_path 0.1 --epochs "$EPOCHS" --warmup_epochs "$WARMUP" --save_ckpt_freq 1)
fi
if [ -z "${DRY_RUN:-}" ]; then
  [ -f "$CKPT" ] || launcher_fail "checkpoint not found: $CKPT"
  for f in "${FILES[@]}"; do
    case "$f" in
      *.json) [ -f "$f" ] || launcher_fail "annotation file not found: $f (DATA_DIR=$DATA_DIR: the Singularity layout, see this script's header)" ;;
    esac
  done
fi

launcher_command run_simvtp_qa.py 1 29506
cmd=("${LAUNCH[@]}" "${MODEL[@]}" "${FILES[@]}" --data_root "$VIDEO_ROOT" --finetune "$CKPT"
     --output_dir "$OUTPUT_DIR" --log_dir "$OUTPUT_DIR/tb" "${OPTIM[@]}" "$@")
launcher_run "${cmd[@]}"
