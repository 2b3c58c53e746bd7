#!/usr/bin/env bash
# The server load test of docs/performance.md: the same bounded load (bench_serve.py:
# CLIENTS concurrent streaming clients x REQUESTS requests x MAX_TOKENS tokens, greedy,
# ignore_eos) against
#   1. atmoe serve --model BASE                 (no experts)
#   2. atmoe serve --bundle BUNDLE              (mixed: routed, top-1 group, one expert, the base)
#   3. llama-server -m BASE                     (llama.cpp, no adapter)
#   4. llama-server -m BASE --lora ADAPTER.gguf (llama.cpp, one adapter on every request)
# one after another on this machine, each with every core. Results: bench/results/serve_*.json.
#
#   LLAMA_SERVER=.cache/llama/build/bin/llama-server LORA_GGUF=/tmp/medicine-0.gguf bench/serve_matrix.sh
#
# LORA_GGUF: the bundle's first expert converted with bench/peft_to_gguf_lora.py (run 4 is
# skipped without it); llama-server is built from llama.cpp's source (docs/performance.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/common.sh"  # ROOT, CACHE, BUILD
ATMOE="${ATMOE:-$BUILD/apps/atmoe}"
LLAMA_SERVER="${LLAMA_SERVER:-$CACHE/llama/build/bin/llama-server}"
BUNDLE="${BUNDLE:-$CACHE/bench-bundles/smollm2_g4x4_r8}"
BASE="${BASE:-$BUNDLE/base.gguf}"
LORA_GGUF="${LORA_GGUF:-}"
CLIENTS="${CLIENTS:-32}" REQUESTS="${REQUESTS:-20}" MAX_TOKENS="${MAX_TOKENS:-16}"
THREADS="${THREADS:-$(nproc)}"
OUT="${OUT:-$ROOT/bench/results}"
PORT="${PORT:-8077}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

wait_up() {  # until /health answers 200 (llama-server: after the model is loaded)
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "server on port $PORT did not come up" >&2
  return 1
}

run() {  # NAME MODEL VARIANTS -- server command...
  local name="$1" model="$2" variants="$3"
  shift 4
  "$@" >"$OUT/serve_$name.log" 2>&1 &
  local pid=$!
  wait_up
  "$PY" "$ROOT/bench/bench_serve.py" --url "http://127.0.0.1:$PORT" --model "$model" --clients "$CLIENTS" \
    --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" --variants "$variants" --label "$name" \
    --out "$OUT/serve_$name.json" | "$PY" -c 'import json,sys; j=json.load(sys.stdin); print(j["label"], "errors", j["errors"], "tok/s %.1f" % j["tokens_per_s"], "TTFT p50 %.3f p99 %.3f" % (j["ttft_s"]["p50"], j["ttft_s"]["p99"]), "ITL p50 %.4f p99 %.4f" % (j["itl_s"]["p50"], j["itl_s"]["p99"]))'
  kill -TERM "$pid"
  wait "$pid" || true
  rm -f "$OUT/serve_$name.log"
}

bid="$(basename "$BUNDLE")"
expert="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["groups"][0]["experts"][0]["name"])' "$BUNDLE/atmoe.json")"
base_id="$(basename "$BASE" .gguf)"
run atmoe_base "$base_id" '[{}]' -- env ATMOE_THREADS="$THREADS" "$ATMOE" serve --model "$BASE" --port "$PORT" \
  --max-running "$CLIENTS"
run atmoe_bundle_mixed "$bid" "[{}, {\"routing\": {\"top_k_groups\": 1}}, {\"model\": \"$expert\"}, {\"model\": \"$base_id\"}]" \
  -- env ATMOE_THREADS="$THREADS" "$ATMOE" serve --bundle "$BUNDLE" --port "$PORT" --max-running "$CLIENTS"
run atmoe_one_expert "$expert" '[{}]' -- env ATMOE_THREADS="$THREADS" "$ATMOE" serve --bundle "$BUNDLE" --port "$PORT" \
  --max-running "$CLIENTS"
if [ -x "$LLAMA_SERVER" ]; then
  ctx=$((CLIENTS * 256))
  run llama_server_base "$base_id" '[{}]' -- "$LLAMA_SERVER" -m "$BASE" --port "$PORT" -t "$THREADS" -tb "$THREADS" \
    -np "$CLIENTS" -c "$ctx" --no-webui
  if [ -n "$LORA_GGUF" ]; then
    run llama_server_lora "$base_id" '[{}]' -- "$LLAMA_SERVER" -m "$BASE" --lora "$LORA_GGUF" --port "$PORT" \
      -t "$THREADS" -tb "$THREADS" -np "$CLIENTS" -c "$ctx" --no-webui
  fi
fi
