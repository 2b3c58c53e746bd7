#!/usr/bin/env bash
# The README's test command: installs what is missing, fetches the sample model, builds,
# runs the format/tokenizer tests under ASan+UBSan, then the whole CPU suite with ctest.
# Ends with ctest's summary line; exit code is ctest's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

"$ROOT/deploy/install-deps.sh"
ATMOE_TEST_MODEL="$("$ROOT/deploy/fetch-model.sh")"
# The openai package: e2e_serve uses it as a client (and fails without it here).
ATMOE_TEST_PYTHON="$("$ROOT/deploy/python-deps.sh")"
export ATMOE_TEST_PYTHON ATMOE_REQUIRE_OPENAI=1

log "building (Release) in $BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DATMOE_TEST_MODEL="$ATMOE_TEST_MODEL" >/dev/null
cmake --build "$BUILD" -j"$JOBS"

# Parsers and tokenizer under AddressSanitizer + UndefinedBehaviorSanitizer.
ASAN_BUILD="${BUILD}-asan"
log "building the format tests with -fsanitize=address,undefined in $ASAN_BUILD"
cmake -S "$ROOT" -B "$ASAN_BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATMOE_SANITIZE=ON -DATMOE_ENABLE_CUDA=OFF \
      -DATMOE_TEST_MODEL="$ATMOE_TEST_MODEL" >/dev/null
cmake --build "$ASAN_BUILD" -j"$JOBS" --target test_formats test_tokenizer test_peft_adapter test_router test_validation
(cd "$ASAN_BUILD" && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
   ctest --output-on-failure -R '^(Dtype|Safetensors|Gguf|Config|Tokenizer|Utf8|StreamDecoder|PeftAdapter|Router|Validation)\.') \
  || { log "sanitizer tests failed"; exit 1; }

# Every libFuzzer target built with clang and run for a short smoke over its seeds.
log "fuzz smoke (deploy/fuzz-smoke.sh)"
"$ROOT/deploy/fuzz-smoke.sh" || { log "fuzz smoke failed"; exit 1; }

log "running the test suite"
cd "$BUILD"
set +e
ctest --output-on-failure -j"$JOBS" 2>&1 | tee "$BUILD/ctest.log"
rc=${PIPESTATUS[0]}
set -e
grep -E '^[0-9]+% tests passed' "$BUILD/ctest.log" | tail -n 1
exit "$rc"
