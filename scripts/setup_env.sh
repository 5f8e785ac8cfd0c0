#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install pinned requirements.
# Idempotent: a stamp file records the hash of the requirement files, so re-runs install nothing.
# Usage: scripts/setup_env.sh [--dev]      (TORCH_SPEC overrides the torch requirement, e.g. "torch==2.5.1")
set -euo pipefail
cd "$(dirname "$0")/.."
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "+ $PYTHON -m venv .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt "$req" | sha256sum | cut -c1-16)"
# the dev requirements include requirements.txt: a venv set up with --dev serves the plain setup too
dev_stamp=".venv/.installed-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] && [ ! -f "$dev_stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: a CPU wheel where one is provided, and nothing newer pulled in later.
  echo "+ pip install ${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  echo "+ pip install -r $req"
  .venv/bin/python -m pip install -q -r "$req"
  touch "$stamp"
fi
