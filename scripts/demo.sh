#!/usr/bin/env bash
# Installs PrfaaS into .venv, starts the local cluster (router, cache pool, two PrfaaS prefill
# nodes, one local prefill and one local decode node) with the built-in model, serves a demo
# workload through the router, prints per-request route, TTFT and tokens/s, and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export PYTHONUNBUFFERED=1
exec .venv/bin/prfaas up --model "${PRFAAS_MODEL:-builtin:qwen3_next-tiny}" --demo "$@"
