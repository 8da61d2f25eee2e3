#!/usr/bin/env bash
# The next stage of SViTT's temporal curriculum (4 -> 8 -> 16 frames): the recipe of svitt_pretrain_webvid.sh
# started from CKPT (a SViTT checkpoint of the previous stage, ours or the release's) at FRAMES frames with video
# token keep rate KEEP_RATE (the paper: 8 frames keep 0.6). The relative position tables of CKPT are expanded to
# FRAMES on loading (the release's nearest-neighbour mapping of the temporal offsets); nothing else changes size.
#
# Usage:
#   bash scripts/svitt_expand.sh CKPT FRAMES KEEP_RATE DATA_PATH DATA_ROOT OUTPUT_DIR [extra flags...]
#   e.g. bash scripts/svitt_expand.sh output/svitt_4f/checkpoint-9.pth 8 0.6 webvid.csv videos output/svitt_8f
# Environment: as scripts/svitt_pretrain_webvid.sh (NNODES, GPUS_PER_NODE, MASTER_ADDR, DRY_RUN, PY, ...).
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: bash scripts/svitt_expand.sh CKPT FRAMES KEEP_RATE DATA_PATH DATA_ROOT OUTPUT_DIR [flags]" >&2
  echo "  (runs in .venv via scripts/setup_env.sh; PY=/path/to/python for another environment)" >&2
  exit 2
fi
CKPT="$1" FRAMES="$2" KEEP_RATE="$3"
shift 3
case "$CKPT" in /*) ;; *) CKPT="$PWD/${CKPT#./}" ;; esac
if [ -z "${DRY_RUN:-}" ] && [ ! -f "$CKPT" ]; then
  echo "error: checkpoint not found: $CKPT" >&2
  exit 2
fi
DATA_PATH="$1" DATA_ROOT="$2" OUTPUT_DIR="$3"
shift 3
INIT_CKPT="$CKPT" exec bash "$(dirname "${BASH_SOURCE[0]}")/svitt_pretrain_webvid.sh" "$DATA_PATH" "$DATA_ROOT" \
  "$OUTPUT_DIR" --num_frames "$FRAMES" --token_keep_rate "$KEEP_RATE" "$@"
