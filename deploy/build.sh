#!/usr/bin/env bash
# Configures and builds atmoe (Release) into $ATMOE_BUILD_DIR (default build/).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$BUILD" -j"$JOBS"
