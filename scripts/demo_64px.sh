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

# The checkpoint a pre-training in $1 of $2 epochs ends with (a dry run has not written `latest`).
last_checkpoint() {
  if [ -n "${DRY_RUN:-}" ]; then echo "$1/checkpoint-$(($2 - 1)).pth"; else echo "$1/$(cat "$1/latest")"; fi
}
