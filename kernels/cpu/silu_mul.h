// SwiGLU activation: out[t, i] = silu(g[t, i]) * u[t, i], silu(z) = z / (1 + exp(-z)).
//   g, u: f32 [T, F] with row strides ldg, ldu; out: [T, F] stride ldo (may alias g).
#pragma once
#include <cstdint>

namespace atmoe { class ThreadPool; }

namespace atmoe::cpu {

struct SiluMulParams {
  const float* g = nullptr;
  int64_t ldg = 0;
  const float* u = nullptr;
  int64_t ldu = 0;
  float* out = nullptr;
  int64_t ldo = 0;
  int64_t T = 0, F = 0;
};

void silu_mul(const SiluMulParams& p, ThreadPool* pool);
void silu_mul_ref(const SiluMulParams& p);

}  // namespace atmoe::cpu
