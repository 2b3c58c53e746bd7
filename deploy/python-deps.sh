#!/usr/bin/env bash
# The Python packages the e2e tests use beyond the standard library (the `openai` client of
# tests/e2e/serve.py), in a venv under the cache. Prints the venv's python. Idempotent.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
VENV="$CACHE/venv-test"
PY="$VENV/bin/python"
if ! "$PY" -c "import openai" 2>/dev/null; then
  log "creating $VENV with the openai package"
  python3 -m venv "$VENV" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check "openai>=1.30" >&2
fi
echo "$PY"
