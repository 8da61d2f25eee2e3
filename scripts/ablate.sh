#!/usr/bin/env bash
# Do the papers' claims hold at toy scale? Runs every ablation study on a synthetic set on CPU, then writes
# output/ablations/claims.md (one table per study) and output/ablations/claims.png (one panel per study).
# Safe to stop and start again: finished runs are never repeated, failed ones are retried.
# Leaves about 8 GB at the defaults (pre-training checkpoints, fine-tunings' best weights); the runner prints its
# estimate at start and warns when the disk has less free.
# Knobs (environment): ABLATE_STUDIES (default: all; e.g. "video_mask text_mask"; see run_ablations.py --help),
# ABLATE_SEEDS (default "0 1"), ABLATE_EPOCHS (pre-training epochs, default 5), ABLATE_FINETUNE_EPOCHS (3),
# ABLATE_OUT (output/ablations), ABLATE_DATA (data/synthetic_ablate: the bundled generator at 64 x 64 px).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh requirements.txt
source scripts/fast_malloc.sh
fast_malloc  # tcmalloc when installed: faster CPU training steps (SIMVTP_MALLOC=glibc to keep glibc's)
export TOKENIZERS_PARALLELISM=false

DATA="${ABLATE_DATA:-data/synthetic_ablate}"
"$PY" synthetic_dataset.py --out "$DATA" --size 64
read -r -a STUDIES <<< "${ABLATE_STUDIES:-}"
read -r -a SEEDS <<< "${ABLATE_SEEDS:-0 1}"
"$PY" run_ablations.py --out "${ABLATE_OUT:-output/ablations}" --data_root "$DATA" --seeds "${SEEDS[@]}" \
  --epochs "${ABLATE_EPOCHS:-5}" --finetune_epochs "${ABLATE_FINETUNE_EPOCHS:-3}" \
  ${STUDIES[@]+--studies "${STUDIES[@]}"}
