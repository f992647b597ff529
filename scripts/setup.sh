#!/usr/bin/env bash
# Creates .venv and installs PrfaaS with the given extras (default: dev).
# On machines that keep a CPU build of torch on local disk (/opt/wheels), that build is used;
# elsewhere pip picks the default build for the platform (CUDA on Linux x86_64).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
# some machines list local package indexes that are absent; pip warns about each one: not ours
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  local_torch=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$local_torch" ]; then
    echo "[setup] installing the local CPU build of torch: $local_torch"
    quiet "${pip[@]}" install "$local_torch"
  else
    echo "[setup] installing torch"
    quiet "${pip[@]}" install "torch>=2.4"
  fi
fi
echo "[setup] installing prfaas[$extras]"
quiet "${pip[@]}" install -e ".[$extras]"
echo "[setup] done"
