#!/usr/bin/env bash
# Reconstruction figure of a pre-training checkpoint on any video and caption (run_simvtp_vis.py; see its --help).
#
# Usage:
#   bash scripts/vis.sh CKPT VIDEO "CAPTION" [OUT.png] [more run_simvtp_vis.py flags...]
#   CKPT=... VIDEO=... CAPTION="..." [OUT=...] bash scripts/vis.sh [flags...]     (the same, from the environment)
#   e.g. bash scripts/vis.sh output/demo/pretrain/checkpoint-4.pth data/synthetic_2k_64/test/test_00000.mp4 \
#          "the little gray box slides right on a red background" vis.png --frame_start 8 --frame_stride 2
# Without OUT the PNG goes to output/vis/reconstruction_<video name>.png (or under --output_dir).
# Paths (CKPT, VIDEO, OUT, --output_dir) are taken from the folder you run it in: the script does not change directory.
# DRY_RUN=1 prints the command instead of running it (and skips the .venv set-up); PY=/path/to/python runs it in
# an environment you manage instead of the repository's .venv.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  echo "usage: bash scripts/vis.sh CKPT VIDEO \"CAPTION\" [OUT.png] [run_simvtp_vis.py flags...]" >&2
  echo "   or: CKPT=... VIDEO=... CAPTION=... [OUT=...] bash scripts/vis.sh [flags...]" >&2
  exit 2
}

if [ $# -ge 3 ] && [[ "$1" != --* ]]; then
  CKPT="$1"; VIDEO="$2"; CAPTION="$3"; shift 3
  if [ $# -gt 0 ] && [[ "$1" != --* ]]; then OUT="$1"; shift; fi
fi
[ -n "${CKPT:-}" ] && [ -n "${VIDEO:-}" ] && [ -n "${CAPTION:-}" ] || usage

if [ -z "${DRY_RUN:-}" ] && [ -z "${PY:-}" ]; then
  source "$REPO/scripts/setup_env.sh" requirements.txt  # sets PY, the .venv's python
fi
cmd=("${PY:-python}" "$REPO/run_simvtp_vis.py" --ckpt "$CKPT" --video "$VIDEO" --caption "$CAPTION")
if [ -n "${OUT:-}" ]; then cmd+=(--save_path "$OUT"); fi
cmd+=("$@")

if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
