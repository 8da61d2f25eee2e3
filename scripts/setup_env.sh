#!/usr/bin/env bash
# Shared set-up of the scripts (demo.sh, test.sh, vis.sh and the recipes): create or reuse .venv and install
# what is missing.
# Sourced by them (it exports PY, the venv's python); `bash scripts/setup_env.sh` alone just prepares .venv.
# Safe to run any number of times.
# Usage: source scripts/setup_env.sh [requirements files...]   (default: requirements.txt)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQS=("$@")
[ ${#REQS[@]} -gt 0 ] || REQS=(requirements.txt)

pick_python() {
  for cand in "${PYTHON:-}" python3.11 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      echo "$cand"; return 0
    fi
  done
  echo "error: need Python >= 3.10 (3.11 recommended); set PYTHON=/path/to/python" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  BASE_PY="$(pick_python)"
  echo "[setup] creating $VENV with $($BASE_PY --version)"
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Install only when the requirement files changed since the last successful install.
STAMP="$VENV/.installed-requirements"
WANT="$(cd "$ROOT" && cat "${REQS[@]}" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || ! grep -qx "$WANT" "$STAMP"; then
  echo "[setup] installing ${REQS[*]} into .venv (torch takes about a minute)"
  (cd "$ROOT" && "$PY" -m pip install --disable-pip-version-check -q $(printf -- '-r %s ' "${REQS[@]}"))
  echo "$WANT" >> "$STAMP"
else
  echo "[setup] .venv up to date"
fi
export PY
export TOKENIZERS_PARALLELISM=false
