#include "kernels/cpu/cpu_features.h"

#include "common/env.h"
#include "common/error.h"

namespace atmoe::cpu {

static Isa detect() {
  __builtin_cpu_init();
  Isa best = Isa::Scalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::Avx512;
  const std::string f = env_str("ATMOE_FORCE_ISA");
  const Isa want = f == "scalar" ? Isa::Scalar : f == "avx2" ? Isa::Avx2 : f == "avx512" ? Isa::Avx512 : best;
  ATMOE_CHECK_INPUT(want <= best, "environment variable ATMOE_FORCE_ISA={}: this CPU supports at most {}", f, isa_name(best));
  return want;
}

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

bool gemv_prefetch() {
  static const bool on = [] {
    const std::string v = env_str("ATMOE_GEMV_PREFETCH");
    __builtin_cpu_init();
    return v == "auto" ? bool(__builtin_cpu_is("intel")) : v == "on";
  }();
  return on;
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "?";
}

}  // namespace atmoe::cpu
