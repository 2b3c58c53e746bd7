// Row softmax on the device, in place; the CPU twin kernels/cpu/softmax.h is the
// specification: softmax of scale · x over each row of x [R, C] (stride ld); a row whose
// maximum of scale · x is not finite (all -inf, or a +inf) becomes all zero.
// One block per row: max, sum of exp, then the normalised values (exp recomputed).
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe::cuda {

int softmax_rows(const ops::SoftmaxParams& p, void* stream);

}  // namespace atmoe::cuda
