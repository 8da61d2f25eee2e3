# Sourced by scripts/demo.sh and scripts/demo_time.sh (from the repository root): the 1,920-clip set at 64 px they
# share and their step helpers. DRY_RUN=1 prints each command instead of running it (and sets up nothing).
# Needs DEMO_TAG (the name in "took" lines) set before sourcing.
if [ -z "${DRY_RUN:-}" ]; then
  source scripts/setup_env.sh requirements.txt
  source scripts/fast_malloc.sh
  fast_malloc
fi
PY="${PY:-.venv/bin/python}"
DATA=data/synthetic_2k_64
ANN="$DATA/annotations"
export TOKENIZERS_PARALLELISM=false

step() { [ -n "${DRY_RUN:-}" ] || { echo; echo "=== $* ==="; }; }
run() {
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; return; fi
  local t0=$SECONDS; "$@"; echo "[$DEMO_TAG] took $((SECONDS - t0)) s"
}

# The synthetic grammar with 1,920 training clips at 64 px (val and test: the 48 and 64 clips of the default set,
# drawn at 64 px).
build_data() { run "$PY" synthetic_dataset.py --out "$DATA" --num_train 1920 --size 64; }

# One clip shape for every step: 8 frames of 64 x 64 px (4 x 4 tubes per time slice), stride 4. Clips are decoded in
# the training process (--num_workers 0): on 2 cores a loader process competes with the 2 compute threads, and the
# steps ran 25-35% slower with one (clips decode at over 150 per second per core here, so the loader never waits).
CLIP=(--num_frames 8 --sampling_rate 4 --input_size 64 --device cpu --precision auto --num_workers 0)
EVAL=(--short_side_size 64 --test_num_segment 2 --test_num_crop 1 --batch_size 16)

# What every pre-training here shares (the demo compares its two families on the same clips and steps).
PRETRAIN=(--data_path "$ANN/pretrain.json" --data_root "$DATA" "${CLIP[@]}" --batch_size 16 --warmup_steps 100
  --min_lr 1e-5 --print_freq 20 --save_ckpt_freq 0 --keep_last 1 --eval_data_path "$ANN/val.json")

# The demo's SimVTP pre-training (scripts/demo.sh step 2; scripts/demo_time.sh adds the time-order loss). The
# matching head (VTM) from random weights: its pairs carry the whole caption (the masked one rarely keeps the words
# that tell a pair apart), negatives are uniform for 3 epochs, then one by similarity and one uniform per positive
# (with hard negatives only, from the start, the head stays on the constant "no match"). It trains on the 10% of
# tubes the mask leaves, so it also scores held-out pairs through 4 such masks (--match_mask_ratio 0.9).
SIMVTP_PRETRAIN=("${PRETRAIN[@]}" --model simvtp_tiny_patch16 --vtm_text full --vtm_negatives mixed
  --vtm_random_epochs 3 --match_mask_ratio 0.9 --lr 5e-3)

# The checkpoint a pre-training in $1 of $2 epochs ends with (a dry run has not written `latest`).
last_checkpoint() {
  if [ -n "${DRY_RUN:-}" ]; then echo "$1/checkpoint-$(($2 - 1)).pth"; else echo "$1/$(cat "$1/latest")"; fi
}
