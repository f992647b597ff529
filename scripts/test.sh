#!/usr/bin/env bash
# Installs PrfaaS with its dev extras into .venv and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
