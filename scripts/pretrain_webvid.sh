#!/usr/bin/env bash
# The paper's pre-training recipe on WebVid-2M: 8 nodes x 8 GPUs, 16 clips per GPU (global batch 1024),
# 200 epochs, base lr 1.5e-4 (scaled by global batch / 256), 40 warm-up epochs, tube mask 0.9, text mask 0.75,
# 16 frames with stride 4, 224 px, starting from VideoMAE's K400 checkpoint and BERT's embeddings when given.
#
# Usage (run once per node):
#   NODE_RANK=0 MASTER_ADDR=node0 bash scripts/pretrain_webvid.sh DATA_PATH DATA_ROOT OUTPUT_DIR [extra flags...]
# Environment (defaults): NNODES=8 GPUS_PER_NODE=8 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
#   INIT_CKPT (VideoMAE checkpoint, optional) BERT_PATH (local bert-base-uncased dir, optional)
#   DRY_RUN=1 prints the command instead of running it (and skips the .venv set-up).
# Runs in the project's .venv (made or updated by scripts/setup_env.sh on first use, as demo.sh does; with several
# nodes run `bash scripts/setup_env.sh` once before starting them) - nothing needs to be activated, no torchrun on
# PATH. PY=/path/to/python runs it in an environment you manage instead (e.g. a cluster's conda env).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATA_PATH="${1:-${DATA_PATH:-}}"
DATA_ROOT="${2:-${DATA_ROOT:-}}"
OUTPUT_DIR="${3:-${OUTPUT_DIR:-output/pretrain_webvid}}"
shift $(( $# < 3 ? $# : 3 ))
if [ -z "$DATA_PATH" ] || [ -z "$DATA_ROOT" ]; then
  echo "usage: NODE_RANK=i MASTER_ADDR=host bash scripts/pretrain_webvid.sh DATA_PATH DATA_ROOT OUTPUT_DIR [flags]" >&2
  echo "  (runs in .venv via scripts/setup_env.sh; PY=/path/to/python for another environment)" >&2
  exit 2
fi

if [ -z "${DRY_RUN:-}" ] && [ -z "${PY:-}" ]; then
  source scripts/setup_env.sh requirements.txt  # sets PY, the .venv's python
fi
cmd=("${PY:-$PWD/.venv/bin/python}" -m torch.distributed.run
     --nnodes "${NNODES:-8}" --nproc_per_node "${GPUS_PER_NODE:-8}" --node_rank "${NODE_RANK:-0}"
     --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
     run_simvtp_pretraining.py
     --data_path "$DATA_PATH" --data_root "$DATA_ROOT" --output_dir "$OUTPUT_DIR"
     --model simvtp_base_patch16 --decoder_depth 4
     --mask_type tube --mask_ratio 0.9 --text_mask_ratio 0.75
     --batch_size 16 --num_frames 16 --sampling_rate 4 --input_size 224
     --opt adamw --opt_betas 0.9 0.95 --lr 1.5e-4 --min_lr 1e-5 --warmup_epochs 40 --epochs 200
     --weight_decay 0.05 --save_ckpt_freq 20 --save_every_steps 1000 --num_workers 10
     --device cuda --precision auto)
[ -n "${INIT_CKPT:-}" ] && cmd+=(--init_ckpt "$INIT_CKPT")
[ -n "${BERT_PATH:-}" ] && cmd+=(--bert_path "$BERT_PATH")
cmd+=("$@")

if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
