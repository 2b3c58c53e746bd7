// Run-time ISA selection for the CPU kernels (ATMOE_FORCE_ISA can lower it).
#pragma once

namespace atmoe::cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };
Isa best_isa();
const char* isa_name(Isa i);
// Whether the decode GEMV prefetches its weight rows ahead (matmul.h, kGemvAhead): on for
// Intel CPUs, where it measured faster; off for every other vendor (measured slower on AMD
// Zen 4: its hardware prefetchers alone do better; docs/performance.md).
// ATMOE_GEMV_PREFETCH=on or off overrides. Read once; atmoe's main() reads it first.
bool gemv_prefetch();

}  // namespace atmoe::cpu
