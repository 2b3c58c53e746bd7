// Rotary embedding on the device, in place; the CPU twin kernels/cpu/rope.h is the
// specification (ops::RopeParams: x [T, H, D] stride ldx, pos [T] int32, inv_freq [D/2]).
// Angles as on the CPU: pos · inv_freq in double (exact: a product of two floats), its
// cosine and sine in double rounded to f32, the rotation in f32. One block per token; the
// D/2 (cos, sin) pairs of the token live in shared memory for its H heads.
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe::cuda {

// D <= kRopeMaxD. Returns the launch's cudaError_t as int (0 = success).
constexpr int64_t kRopeMaxD = 4096;
int rope(const ops::RopeParams& p, void* stream);

}  // namespace atmoe::cuda
