// Run-time ISA selection for the CPU kernels (ATMOE_FORCE_ISA can lower it).
#pragma once

namespace atmoe::cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };
Isa best_isa();
const char* isa_name(Isa i);

}  // namespace atmoe::cpu
