#!/usr/bin/env bash
# A guidellm sweep against the front door of a `prfaas up` cluster (docs/bench_openai.md).
#
#   bash bench/openai_sweep.sh MODEL_DIR [RATES] [SECONDS]      e.g. MODEL_DIR with tokenizer.json
#
# guidellm is not a dependency of PrfaaS: install it in its own venv first, with the local CPU torch
# where there is one (guidellm depends on torch; without it pip fetches the CUDA build):
#   python3 -m venv /tmp/gl && /tmp/gl/bin/pip install /opt/wheels/torch-*.whl guidellm
# GUIDELLM (default /tmp/gl/bin/guidellm) names the binary. The run is bounded: len(RATES) x SECONDS.
set -euo pipefail
model="$(cd "$1" && pwd)"; rates="${2:-1,2,4}"; seconds="${3:-20}"
guidellm="${GUIDELLM:-/tmp/gl/bin/guidellm}"
out="${OUT:-.prfaas/bench_openai}"; mkdir -p "$out"
cfg="$out/cluster.toml"
printf 'prfaas_prefill = 1\nlocal_prefill = 1\nlocal_decode = 1\nthreshold_tokens = 256\n' > "$cfg"
python -m prfaas.cli up --model "$model" --config "$cfg" --log-dir "$out/logs" > "$out/up.log" 2>&1 &
up=$!
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 600); do grep -q '"ready"' "$out/up.log" 2>/dev/null && break; sleep 0.5; done
url=$(python -c "import json,sys; print(next(json.loads(l)['openai'] for l in open(sys.argv[1]) if l.startswith('{')))" "$out/up.log")
echo "[sweep] front door at $url; rates $rates req/s, ${seconds}s each"
# the served model name is the directory's name; guidellm loads its tokenizer from that path
cd "$(dirname "$model")"
"$guidellm" run \
  --backend "kind=openai_http,target=${url%/v1},model=$(basename "$model"),request_format=/v1/completions" \
  --profile kind=constant,rate=1 --override profile.rate "$rates" \
  --data kind=synthetic_text,prompt_tokens=256,prompt_tokens_stdev=128,prompt_tokens_min=32,prompt_tokens_max=512,output_tokens=32 \
  --constraint "kind=max_duration,seconds=$seconds" \
  --output "kind=json,path=$OLDPWD/$out/report.json" --output kind=console --disable-progress
