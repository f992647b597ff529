#!/usr/bin/env bash
# Builds llama-cpp-python from its source distribution for the llama.cpp baseline of
# bench/engine.py (bench/llamacpp.py), and keeps the sdist's llama.cpp converter where the bench
# looks for it (~/.cache/prfaas/llama.cpp-src/<sdist>/vendor/llama.cpp).
#
#   bash scripts/bench_setup.sh            # into .venv (VENV=path for another one)
#
# A CPU-only build optimised for this machine's CPU (GGML_NATIVE: -march=native), with OpenMP
# threads, no BLAS, no GPU back end, and none of llama.cpp's tools, tests or servers. About 10
# minutes on two cores; the log goes to ~/.cache/prfaas/llama.cpp-src/build.log. Never needed by
# the tests: without llama_cpp the bench prints why and leaves the llama.cpp column empty.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
venv="${VENV:-.venv}"
src_root="${PRFAAS_LLAMA_CPP_SRC_ROOT:-$HOME/.cache/prfaas/llama.cpp-src}"
py="$venv/bin/python"
[ -x "$py" ] || { echo "[bench-setup] no $py: run scripts/setup.sh first (or set VENV)" >&2; exit 1; }
command -v cmake >/dev/null && command -v c++ >/dev/null \
  || { echo "[bench-setup] needs cmake and a C++ compiler (apt-get install cmake g++)" >&2; exit 1; }
mkdir -p "$src_root"
sdist="$src_root/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  echo "[bench-setup] downloading the llama-cpp-python $version source distribution"
  "$py" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$src_root" "llama-cpp-python==$version"
fi
tree="$src_root/llama_cpp_python-$version"
[ -d "$tree" ] || tar -xzf "$sdist" -C "$src_root"
echo "[bench-setup] converter: $tree/vendor/llama.cpp/convert_hf_to_gguf.py"
export CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CPU=ON -DGGML_OPENMP=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF \
-DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
log="$src_root/build.log"
start=$(date +%s)
wheel=$(ls -t "$src_root"/wheels/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ] && [ -z "${REBUILD:-}" ]; then
  echo "[bench-setup] reusing $wheel (REBUILD=1 builds it again)"
else
  echo "[bench-setup] building llama-cpp-python $version (CMAKE_ARGS=$CMAKE_ARGS); log: $log"
  "$py" -m pip wheel -v --disable-pip-version-check --no-deps -w "$src_root/wheels" "$tree" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    step=$(grep -o '^ *\[[0-9]*/[0-9]*\]' "$log" | tail -n1 | tr -d ' ' || true)
    echo "[bench-setup] $(( $(date +%s) - start )) s: ${step:-configuring}"
  done
  wait "$pid" || { tail -n 30 "$log" >&2; echo "[bench-setup] build failed; see $log" >&2; exit 1; }
  wheel=$(ls -t "$src_root"/wheels/llama_cpp_python-"$version"-*.whl | head -n1)
fi
"$py" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"
"$py" -m pip install -q --disable-pip-version-check "$wheel"  # its few dependencies (diskcache, jinja2 ...)
"$py" -c "import llama_cpp; print('[bench-setup] llama_cpp', llama_cpp.__version__, 'from', llama_cpp.__file__)"
echo "[bench-setup] done in $(( $(date +%s) - start )) s"
