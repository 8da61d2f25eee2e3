#!/usr/bin/env bash
# Reconstruction figure of a pre-training checkpoint on any video and caption (run_simvtp_vis.py; see --help).
# Usage: bash scripts/vis.sh CKPT VIDEO "CAPTION" [OUT.png] [more run_simvtp_vis.py flags...]
#   e.g. bash scripts/vis.sh output/demo/pretrain/checkpoint-19.pth data/synthetic/test/test_00000.mp4 \
#          "a small red disc moves left" vis.png --frame_start 8 --frame_stride 2
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ $# -lt 3 ]; then
  echo "usage: bash scripts/vis.sh CKPT VIDEO \"CAPTION\" [OUT.png] [run_simvtp_vis.py flags...]" >&2
  exit 2
fi
CKPT="$1"; VIDEO="$2"; CAPTION="$3"; shift 3
OUT="output/vis/reconstruction.png"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then OUT="$1"; shift; fi
source scripts/setup_env.sh requirements.txt
exec "$PY" run_simvtp_vis.py --ckpt "$CKPT" --video "$VIDEO" --caption "$CAPTION" --save_path "$OUT" "$@"
