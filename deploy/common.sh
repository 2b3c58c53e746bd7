# Sourced by the deploy scripts: repo root, cache dir, helpers.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ATMOE_CACHE:-$ROOT/.cache}"
BUILD="${ATMOE_BUILD_DIR:-$ROOT/build}"
MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL="$CACHE/models/$MODEL_NAME"
JOBS="${JOBS:-$(nproc)}"
log() { printf '[atmoe-deploy] %s\n' "$*" >&2; }
