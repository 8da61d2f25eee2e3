#!/usr/bin/env bash
# SViTT's pre-training recipe on WebVid-2M (stage 1 of the temporal curriculum): 4 frames of 224 px (one random
# frame per equal segment), BEiT-B/16 + BERT-base, edge sparsity (local window 1, 3 random blocks of 56 tokens) and
# node sparsity (keep 0.7 of the video tokens after vision layers 3, 6 and 9), losses ITC + ITM + MLM (50% of the
# words, 80/10/10), 32 clips per GPU, AdamW lr 3e-5 (our --lr is per 256 clips: 8 GPUs x 32 = 256, so 3e-5 as the
# paper), weight decay 0.02, cosine over 10 epochs with 1 warm-up epoch down to 1% of the peak.
# Matching head (docs/matching_heads.md): the release's behaviour, hard ITM negatives from the first step and no
# time-order loss; the demo's --vtm_negatives mixed --vtm_random_epochs 3 are its remedy for a tiny model from random
# weights, whose head otherwise stays on the constant "no match". This recipe starts from BEiT and BERT weights, as the
# paper. To check, give held-out pairs (--eval_data_path): if the matching accuracy sits at the constant answer's 66.7,
# add --vtm_random_epochs 1.
# Next stages: scripts/svitt_expand.sh CKPT 8 0.6 ... then CKPT 16 ... (the frame count is expanded on loading).
#
# Usage (run once per node):
#   bash scripts/svitt_pretrain_webvid.sh DATA_PATH DATA_ROOT OUTPUT_DIR [extra flags...]
# Relative paths are taken from the folder you run it in. OUTPUT_DIR must be on storage every node sees.
# Environment (defaults): NNODES=1 GPUS_PER_NODE=8 NODE_RANK=0 MASTER_ADDR (required with NNODES > 1)
#   MASTER_PORT=29503 (with SLURM_JOB_ID: derived from it) BEIT_PATH (local Hugging Face BEiT, e.g.
#   beit-base-patch16-224-pt22k-ft22k) BERT_PATH (local bert-base-uncased) INIT_CKPT (a SViTT checkpoint to start
#   from) DRY_RUN=1 prints the command instead of running it. PY=/path/to/python: another environment.
# The launch itself (torchrun or srun, port, paths) is scripts/launcher.sh, shared by the recipes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"

DATA_PATH="${1:-${DATA_PATH:-}}"
DATA_ROOT="${2:-${DATA_ROOT:-}}"
OUTPUT_DIR="${3:-${OUTPUT_DIR:-output/svitt_pretrain_webvid}}"
shift $(( $# < 3 ? $# : 3 ))
if [ -z "$DATA_PATH" ] || [ -z "$DATA_ROOT" ]; then
  echo "usage: bash scripts/svitt_pretrain_webvid.sh DATA_PATH DATA_ROOT OUTPUT_DIR [flags]" >&2
  echo "  (runs in .venv via scripts/setup_env.sh; PY=/path/to/python for another environment)" >&2
  exit 2
fi

NNODES="${NNODES:-1}"
launcher_paths DATA_PATH DATA_ROOT OUTPUT_DIR INIT_CKPT BEIT_PATH BERT_PATH
launcher_command run_simvtp_pretraining.py 1 29503
cmd=("${LAUNCH[@]}"
     --data_path "$DATA_PATH" --data_root "$DATA_ROOT" --output_dir "$OUTPUT_DIR"
     --model svitt_base_patch16_224 --drop_path 0.1
     --sparse_local_attn 1 --sparse_random_attn 3 --attn_block_size 56
     --token_keep_rate 0.7 --token_drop_loc 3 6 9 --token_keep_strategy cls_attn
     --w_itc 1 --w_itm 1 --w_mlm 1 --vtm_negatives hard --text_mask_ratio 0.5 --max_text_len 32
     --batch_size 32 --num_frames 4 --sample_type rand --sample_type_test middle --input_size 224
     --opt adamw --opt_betas 0.9 0.999 --lr 3e-5 --min_lr 3e-7 --warmup_lr 3e-7 --warmup_epochs 1 --epochs 10
     --weight_decay 0.02 --save_ckpt_freq 1 --save_every_steps 1000 --num_workers 10
     --device cuda --precision auto)
[ -n "${INIT_CKPT:-}" ] && cmd+=(--init_ckpt "$INIT_CKPT")
[ -n "${BEIT_PATH:-}" ] && cmd+=(--beit_path "$BEIT_PATH")
[ -n "${BERT_PATH:-}" ] && cmd+=(--bert_path "$BERT_PATH")
cmd+=("$@")

launcher_run "${cmd[@]}"
