#!/usr/bin/env bash
# From nothing to a pre-trained tiny SimVTP on CPU: set up .venv, build the synthetic video-text set (if absent),
# pre-train, then print where everything went. Safe to run again: finished steps are reused
# (the pre-training run auto-resumes and stops at once when all its epochs are done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh requirements.txt

DATA=data/synthetic
OUT=output/demo
EPOCHS="${DEMO_EPOCHS:-6}"
mkdir -p "$OUT"
step() { echo; echo "=== $* ==="; }
timed() { local t0=$SECONDS; "$@"; echo "[demo] took $((SECONDS - t0)) s"; }

step "1/2 synthetic video-text dataset -> $DATA"
timed "$PY" synthetic_dataset.py --out "$DATA"

step "2/2 pre-training simvtp_tiny_patch16 on CPU ($EPOCHS epochs) -> $OUT/pretrain"
timed "$PY" run_simvtp_pretraining.py --data_path "$DATA/annotations/pretrain.json" --data_root "$DATA" \
  --model simvtp_tiny_patch16 --num_frames 8 --input_size 112 --batch_size 16 \
  --epochs "$EPOCHS" --warmup_epochs 1 --lr 1.5e-3 --min_lr 1e-5 --num_workers 1 \
  --device cpu --precision auto --print_freq 5 --output_dir "$OUT/pretrain"

echo
echo "Done. Outputs:"
echo "  dataset:        $DATA (annotations in $DATA/annotations)"
echo "  pre-training:   $OUT/pretrain (checkpoints, log.txt, args.json, tensorboard in tb/)"
