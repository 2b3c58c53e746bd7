#!/usr/bin/env bash
# CI smoke run of the libFuzzer targets (docs/testing.md, "Fuzzing"): configures the clang
# fuzz build in build-fuzz, builds every target (fuzz_all), and runs each one over its seed
# corpus tests/fuzz/seeds/<name>/ for a short time. New corpus entries, scratch files and
# artifacts go to a temporary directory, never into the repository.
# Exit code 0 when every target ran clean; 1 on any crash, sanitizer report, exception
# other than InputError, timeout or OOM (the log tail and the reproducer path are printed;
# reproducers are kept in build-fuzz/fuzz-findings/).
# Needs clang and libFuzzer (Debian: clang, libclang-rt-14-dev; deploy/install-deps.sh).
# Knobs: ATMOE_FUZZ_BUILD_DIR (default ROOT/build-fuzz), ATMOE_FUZZ_SMOKE_SECONDS (per
# target, default 15), JOBS (build and run parallelism, default nproc).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FUZZ_BUILD="${ATMOE_FUZZ_BUILD_DIR:-$ROOT/build-fuzz}"
SECONDS_PER_TARGET="${ATMOE_FUZZ_SMOKE_SECONDS:-15}"
TARGETS=(safetensors gguf tokenizer_json bundle_manifest peft_adapter)
T0=$(date +%s)

TMP="$(mktemp -d "$( [ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")/atmoe-fuzz-smoke.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# Toolchain check: clang++ that links -fsanitize=fuzzer (libclang_rt.fuzzer).
command -v clang >/dev/null && command -v clang++ >/dev/null ||
  { log "clang/clang++ not found: run deploy/install-deps.sh (packages clang, libclang-rt-14-dev)"; exit 1; }
printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n' > "$TMP/probe.cpp"
clang++ -fsanitize=fuzzer,address,undefined "$TMP/probe.cpp" -o "$TMP/probe" 2>"$TMP/probe.log" ||
  { cat "$TMP/probe.log" >&2; log "clang++ cannot link libFuzzer: run deploy/install-deps.sh (package libclang-rt-14-dev)"; exit 1; }

log "configuring the fuzz build (clang, ASan+UBSan+libFuzzer) in $FUZZ_BUILD"
CC=clang CXX=clang++ cmake -S "$ROOT" -B "$FUZZ_BUILD" -DATMOE_BUILD_FUZZ=ON -DATMOE_BUILD_TESTS=OFF \
  -DATMOE_ENABLE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
log "building ${TARGETS[*]/#/fuzz_}"
cmake --build "$FUZZ_BUILD" -j"$JOBS" --target fuzz_all
T1=$(date +%s)

# One target: its log, exit code and final stats land in $TMP/<t>.{log,rc}.
run_one() {
  local t="$1" bin="$FUZZ_BUILD/tests/fuzz/fuzz_$1"
  mkdir -p "$TMP/corpus/$t" "$TMP/artifacts" "$TMP/scratch"
  set +e
  ATMOE_FUZZ_TMP="$TMP/scratch" UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
    "$bin" -max_total_time="$SECONDS_PER_TARGET" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$TMP/artifacts/$t-" "$TMP/corpus/$t" "$ROOT/tests/fuzz/seeds/$t" >"$TMP/$t.log" 2>&1
  echo $? >"$TMP/$t.rc"
}

log "running each target for ${SECONDS_PER_TARGET}s over tests/fuzz/seeds/<target> ($JOBS at a time)"
running=0
for t in "${TARGETS[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

failed=0
for t in "${TARGETS[@]}"; do
  rc="$(cat "$TMP/$t.rc" 2>/dev/null || echo 99)"
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$TMP/$t.log" | tail -n 1 || true)"
  cov="$( (grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9A-Za-z]+' "$TMP/$t.log" || true) | tail -n 1)"
  if [ "$rc" = 0 ]; then
    log "fuzz_$t: ok, ${runs:-?} runs, $cov"
  else
    failed=1
    log "fuzz_$t: FAILED (exit $rc), ${runs:-?} runs; log tail:"
    tail -n 60 "$TMP/$t.log" >&2
    mkdir -p "$FUZZ_BUILD/fuzz-findings"
    for a in "$TMP/artifacts/$t-"*; do
      [ -e "$a" ] || continue
      cp "$a" "$FUZZ_BUILD/fuzz-findings/"
      log "reproducer: $FUZZ_BUILD/fuzz-findings/$(basename "$a")  (replay: $FUZZ_BUILD/tests/fuzz/fuzz_$t FILE)"
    done
  fi
done
T2=$(date +%s)
log "fuzz smoke: build $((T1 - T0))s, runs $((T2 - T1))s, total $((T2 - T0))s"
[ "$failed" = 0 ] || { log "fuzz smoke failed"; exit 1; }
log "fuzz smoke passed"
