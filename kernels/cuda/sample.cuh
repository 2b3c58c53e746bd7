// Greedy token choice on the device: out[r] = argmax of logits row r ([R, V], stride ld),
// the lowest id on ties (the first maximum, as cpu::argmax; a row of all -inf gives 0).
// One block per row. Sampled (non-greedy) rows are drawn on the host by the backend
// (kernels/cuda/backend_cuda.cpp) from the downloaded row, with the CPU's specification.
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe::cuda {

int argmax_rows(const float* logits, int64_t ld, int64_t R, int64_t V, int32_t* out, void* stream);

}  // namespace atmoe::cuda
