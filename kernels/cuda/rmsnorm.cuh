// RMSNorm on the device; the CPU twin kernels/cpu/rmsnorm.h is the specification.
//   x, y: f32 [T, D] device pointers (strides ldx, ldy; y may alias x); w: f32 [D].
// One block per row; block-wide reduction of sum(x^2) in f32.
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe::cuda {

// Returns the launch's cudaError_t as int (0 = success); `stream` is a cudaStream_t.
int rmsnorm(const ops::RmsNormParams& p, void* stream);

}  // namespace atmoe::cuda
