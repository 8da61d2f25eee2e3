#!/usr/bin/env bash
# Set up .venv (same step as the demo) and run the whole test suite. Extra arguments go to pytest; given a test
# file or folder (e.g. tests/test_masking.py or tests/test_masking.py::name), only that runs.
# With 2 or more cores the test files are shared among pytest-xdist workers (one per core, at most 4; each file's
# tests stay in one worker, so a module's fixtures are built once): SIMVTP_TEST_WORKERS=N sets their number, and
# SIMVTP_TEST_WORKERS=1 runs every test in this one process.
# --fast leaves out the tests marked slow (training, processes, end-to-end runs): the pure-logic and small-I/O
# tests, for the edit-test loop (same as -m "not slow").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh requirements.txt requirements-test.txt
cores="$(nproc 2>/dev/null || echo 1)"
workers="${SIMVTP_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
if ! [[ "$workers" =~ ^[0-9]+$ ]] || (( workers < 1 )); then
  echo "scripts/test.sh: SIMVTP_TEST_WORKERS must be a whole number >= 1, got '$workers'" >&2
  exit 2
fi
parallel=()
if (( workers > 1 )); then
  parallel=(-n "$workers" --dist loadfile)
fi
# The suite holds up to ~2 GB at once in the temporary folder (tiny checkpoints with their optimizer state, test
# videos; each test's folder goes when it passes): below SIMVTP_TEST_MIN_FREE_GB (default 3) free, refuse to start
# rather than fail hundreds of tests midway on a full disk.
min_free="${SIMVTP_TEST_MIN_FREE_GB:-3}"
if ! [[ "$min_free" =~ ^[0-9]+$ ]]; then
  echo "scripts/test.sh: SIMVTP_TEST_MIN_FREE_GB must be a whole number of GB, got '$min_free'" >&2
  exit 2
fi
read -r free_gb tmp_dir <<< "$("$PY" -c 'import shutil, tempfile
d = tempfile.gettempdir()
print(shutil.disk_usage(d).free // 2**30, d)')"
if (( free_gb < min_free )); then
  echo "scripts/test.sh: only $free_gb GB free in $tmp_dir, the test suite needs $min_free GB there;" \
       "free some space or point TMPDIR at a larger disk" >&2
  exit 2
fi
echo "scripts/test.sh: $workers pytest worker(s) on $cores core(s), $free_gb GB free in $tmp_dir"
args=()
for arg in "$@"; do
  if [[ "$arg" == "--fast" ]]; then args+=(-m "not slow"); else args+=("$arg"); fi
done
set -- "${args[@]+"${args[@]}"}"
where=(tests)
for arg in "$@"; do  # a test file or folder under tests/ (not an option's value such as --basetemp DIR)
  if [[ "$arg" != -* && -e "${arg%%::*}" && "$(realpath "${arg%%::*}")/" == "$PWD/tests/"* ]]; then where=(); break; fi
done
"$PY" -m pytest "${where[@]}" -q -p no:cacheprovider "${parallel[@]}" "$@"
