#!/usr/bin/env bash
# Packs what a lent GPU machine needs to run atmoe's `gpu` checks without building there:
# that machine has the CUDA toolkit (cudart, cuBLAS) but none of the Debian libraries atmoe
# links (OpenBLAS, spdlog, fmt, PCRE2, utf8proc, OpenMPI, ...) and no network. Builds here
# (Release, CUDA on, CMAKE_CUDA_ARCHITECTURES 80;90) unless --no-build, then copies into
# .cache/device-pack/ (ignored; carried to the device with the run tool's `carry`):
#   bin/    atmoe, test_backend_ops, test_cuda_paths, test_parity
#   lib/    every shared library they load, except glibc's, libstdc++/libgcc and CUDA's own
#   run.sh  the checks, run on the device from the repository root:
#             ctest's gpu tests as plain binaries with ATMOE_REQUIRE_GPU=1 (a skip fails),
#             greedy text of a synth-model, alone and with an AT-MoE and a T-REX bundle, on
#             cuda against cpu (f32); the parity tests on cuda when the model is there,
#             `atmoe bench --device cuda`;
#           output under $OUT (the run tool's folder), one log per step.
# The pack is ~50 MB (OpenBLAS alone 35 MB) and the SmolLM2 GGUF 98 MB, over the 64 MiB a
# call may carry: --model-parts writes the model as two halves (model.part0/1) to carry in
# further calls to the same warm machine (ignored paths already there are kept between
# calls); run.sh joins them when both are there. Not yet run on a device.
#
# Usage: deploy/device-pack.sh [--no-build] [--model-parts]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
BUILD_GPU="${ATMOE_GPU_BUILD_DIR:-$ROOT/build-gpu}"
PACK="$CACHE/device-pack"
build=1 parts=0
for a in "$@"; do
  case "$a" in
    --no-build) build=0 ;;
    --model-parts) parts=1 ;;
    *) log "unknown option $a"; exit 2 ;;
  esac
done
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
if [ "$build" = 1 ]; then
  log "building (Release, CUDA 80;90) in $BUILD_GPU"
  cmake -S "$ROOT" -B "$BUILD_GPU" -DCMAKE_BUILD_TYPE=Release -DATMOE_ENABLE_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="80;90" >/dev/null
  cmake --build "$BUILD_GPU" -j"$JOBS" --target atmoe test_backend_ops test_cuda_paths test_parity
fi
rm -rf "$PACK" && mkdir -p "$PACK/bin" "$PACK/lib"
bins=("$BUILD_GPU/apps/atmoe" "$BUILD_GPU/tests/test_backend_ops" "$BUILD_GPU/tests/test_cuda_paths"
      "$BUILD_GPU/tests/test_parity")
cp "${bins[@]}" "$PACK/bin/"
strip "$PACK"/bin/*
# Shared libraries: all that ldd resolves, but the C runtime and CUDA's (the device has its own).
for b in "${bins[@]}"; do ldd "$b"; done | awk '$3 ~ /^\// {print $3}' | sort -u |
  grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*|libstdc\+\+|libgcc_s)\.so|/usr/local/cuda|/libcuda\.so' |
  while read -r l; do cp -L "$l" "$PACK/lib/"; done
if [ "$parts" = 1 ]; then
  half=$(( ($(stat -c %s "$MODEL") + 1) / 2 ))
  split -b "$half" -d -a 1 "$MODEL" "$PACK/model.part"
fi
cat >"$PACK/run.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: the gpu checks of atmoe (deploy/device-pack.sh).
set -u
P="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-/tmp/atmoe-gpu-out}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$P/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export ATMOE_REQUIRE_GPU=1 ATMOE_GOLDENS="$PWD/tests/parity/goldens"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
rc=0
# A synth-model: its inspect names the GPU; generate on cuda and cpu must give the same greedy text (f32).
"$P/bin/atmoe" synth-model --out /tmp/atmoe-sm --seed 7 --layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 96 \
  --vocab 320 >/dev/null 2>&1
"$P/bin/atmoe" inspect /tmp/atmoe-sm >"$OUT/inspect.txt" 2>&1
for d in cpu cuda; do
  "$P/bin/atmoe" generate --model /tmp/atmoe-sm --device "$d" --dtype f32 --temperature 0 --ignore-eos \
    --max-tokens 24 --prompt "Hello world" >"$OUT/generate_$d.txt" 2>"$OUT/generate_$d.err" || rc=1
done
cmp -s "$OUT/generate_cpu.txt" "$OUT/generate_cuda.txt" || { echo "synth-model: cuda text differs from cpu" >>"$OUT/summary.txt"; rc=1; }
# The same with in-process experts: an AT-MoE bundle (per_token, general expert) and a T-REX one.
"$P/bin/atmoe" synth-bundle --base /tmp/atmoe-sm --out /tmp/atmoe-sb --groups 3 --experts-per-group 2 --rank 4,8 \
  --router-input per_token --general --b-std 0.2 --seed 5 >/dev/null 2>&1
"$P/bin/atmoe" synth-bundle --base /tmp/atmoe-sm --out /tmp/atmoe-tb --method t-rex --rank 4,3 --b-std 0.2 --seed 9 \
  >/dev/null 2>&1
for b in sb tb; do
  for d in cpu cuda; do
    "$P/bin/atmoe" generate --bundle /tmp/atmoe-$b --device "$d" --dtype f32 --temperature 0 --ignore-eos \
      --max-tokens 24 --prompt "Hello world" >"$OUT/generate_${b}_$d.txt" 2>"$OUT/generate_${b}_$d.err" || rc=1
  done
  cmp -s "$OUT/generate_${b}_cpu.txt" "$OUT/generate_${b}_cuda.txt" || { echo "$b: cuda text differs from cpu" >>"$OUT/summary.txt"; rc=1; }
done
"$P/bin/test_backend_ops" --gtest_filter='*/cuda' >"$OUT/test_backend_ops.log" 2>&1 || rc=1
"$P/bin/test_cuda_paths" >"$OUT/test_cuda_paths.log" 2>&1 || rc=1
if [ -f "$P/model.part0" ] && [ -f "$P/model.part1" ]; then
  cat "$P/model.part0" "$P/model.part1" >/tmp/smollm2.gguf
  export ATMOE_TEST_MODEL=/tmp/smollm2.gguf
  "$P/bin/test_parity" --gtest_filter='*/cuda' >"$OUT/test_parity_cuda.log" 2>&1 || rc=1
  "$P/bin/atmoe" bench --model /tmp/smollm2.gguf --device cuda --json "$OUT/bench_smollm2_cuda.json" \
    >"$OUT/bench_smollm2_cuda.txt" 2>&1 || rc=1
fi
tail -n 3 "$OUT"/*.log
exit "$rc"
EOF
chmod +x "$PACK/run.sh"
log "packed $(du -sh "$PACK" | cut -f1) in $PACK ($(ls "$PACK/lib" | wc -l) libraries)"
