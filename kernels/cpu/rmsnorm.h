// RMSNorm: y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * w[:]
//   x, y: f32 [T, D] (strides ldx, ldy; y may alias x); w: f32 [D].
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe { class ThreadPool; }

namespace atmoe::cpu {

using RmsNormParams = ops::RmsNormParams;

void rmsnorm(const RmsNormParams& p, ThreadPool* pool);
void rmsnorm_ref(const RmsNormParams& p);  // double accumulation

}  // namespace atmoe::cpu
