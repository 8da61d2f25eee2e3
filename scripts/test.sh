#!/usr/bin/env bash
# Set up .venv (same step as the demo) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh requirements.txt requirements-test.txt
"$PY" -m pytest tests -q -p no:cacheprovider "$@"
