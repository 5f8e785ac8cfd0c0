#!/usr/bin/env bash
# Set up the virtualenv (with test tools) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh --dev
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile -q "$@"
