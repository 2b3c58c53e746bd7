// RMSNorm: y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * w[:]
//   x, y: f32 [T, D] (strides ldx, ldy; y may alias x); w: f32 [D].
#pragma once
#include <cstdint>

namespace atmoe { class ThreadPool; }

namespace atmoe::cpu {

struct RmsNormParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* w = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t T = 0, D = 0;
  float eps = 1e-5f;
};

void rmsnorm(const RmsNormParams& p, ThreadPool* pool);
void rmsnorm_ref(const RmsNormParams& p);  // double accumulation

}  // namespace atmoe::cpu
