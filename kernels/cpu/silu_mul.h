// SwiGLU activation: out[t, i] = silu(g[t, i]) * u[t, i], silu(z) = z / (1 + exp(-z)).
//   g, u: f32 [T, F] with row strides ldg, ldu; out: [T, F] stride ldo (may alias g).
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe { class ThreadPool; }

namespace atmoe::cpu {

using SiluMulParams = ops::SiluMulParams;

void silu_mul(const SiluMulParams& p, ThreadPool* pool);
void silu_mul_ref(const SiluMulParams& p);

}  // namespace atmoe::cpu
