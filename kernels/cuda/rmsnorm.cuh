// RMSNorm on the device; the CPU twin kernels/cpu/rmsnorm.h is the specification.
//   x, y: f32 [T, D] device pointers (strides ldx, ldy); w: f32 [D].
// One block per row; block-wide reduction of sum(x^2) in f32.
#pragma once
#include <cstdint>

namespace atmoe::cuda {

struct RmsNormParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* w = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t T = 0, D = 0;
  float eps = 1e-5f;
};

// Returns the launch's cudaError_t as int (0 = success); `stream` is a cudaStream_t.
int rmsnorm(const RmsNormParams& p, void* stream);

}  // namespace atmoe::cuda
