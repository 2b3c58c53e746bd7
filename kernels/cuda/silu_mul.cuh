// SiLU(g) · u on the device; the CPU twin kernels/cpu/silu_mul.h is the specification.
//   g, u, out: f32 [T, F] (strides ldg, ldu, ldo); out may alias g (or u): each element is
//   read and written by the same thread.
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe::cuda {

int silu_mul(const ops::SiluMulParams& p, void* stream);

}  // namespace atmoe::cuda
