// Linear layer on the device: y[T, N] (=|+=) x[T, K] · W[N, K]^T (+ bias[N]); the CPU twin
// kernels/cpu/matmul.h (matmul_ref) is the specification (ops::MatmulParams).
// The CUDA backend's prepared weight layout is row-major [N, K] in F32 or BF16 (bf16 = the
// upper 16 bits of an f32, round to nearest even; common/dtype.h). x, y, bias are f32.
// Paths (chosen by CudaBackend::matmul):
//   - T <= kGemvMaxTokens (decode): matmul_gemv, one warp per output row n reading W's row
//     once for all T tokens (8 elements per lane per step when K % 8 == 0 and the rows are
//     16-byte aligned), f32 accumulation, bias and accumulate fused;
//   - larger T: cuBLAS in the backend (f32: Sgemm; bf16: x converted by f32_to_bf16_rows
//     into the workspace [T, K] bf16, then GemmEx bf16 x bf16 -> f32 with f32 compute), bias
//     and accumulate through add_bias_rows + beta = 1.
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe::cuda {

constexpr int64_t kGemvMaxTokens = 8;

// p.T in 1..kGemvMaxTokens; p.w_dtype F32 or BF16. Returns the launch's cudaError_t as int.
int matmul_gemv(const ops::MatmulParams& p, void* stream);
// out[t * K + k] = bf16(x[t * ldx + k]) (round to nearest even), out: [T, K] uint16 device.
int f32_to_bf16_rows(const float* x, int64_t ldx, int64_t T, int64_t K, void* out, void* stream);
// y[t, n] = (accumulate ? y[t, n] : 0) + bias[n]  (bias == nullptr: 0).
int add_bias_rows(const float* bias, float* y, int64_t ldy, int64_t T, int64_t N, bool accumulate, void* stream);

}  // namespace atmoe::cuda
