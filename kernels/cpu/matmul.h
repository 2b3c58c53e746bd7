// Linear layer: y[T, N] = x[T, K] · W[N, K]^T (+ bias[N]) (+ y when accumulate).
//   x: f32 row-major, stride ldx (>= K); y: f32, stride ldy (>= N).
//   W: f32 or bf16, row-major [N, K] (the PyTorch Linear layout), stride K.
// Paths: T >= kBlasMinTokens -> OpenBLAS sgemm (bf16 W converted to f32 in row panels
// held in the workspace); otherwise the hand-written SIMD GEMV/GEMM (AVX-512 or AVX2,
// chosen at run time) that streams bf16 weights once and accumulates in f32.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace atmoe {
class ThreadPool;
}

namespace atmoe::cpu {

struct MatmulParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;
  DType w_dtype = DType::F32;
  const float* bias = nullptr;  // optional
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t T = 0, N = 0, K = 0;
  bool accumulate = false;  // y += x W^T instead of y = x W^T
};

constexpr int64_t kBlasMinTokens = 32;

// Workspace floats the BLAS path needs for bf16 weights (0 for f32).
int64_t matmul_workspace_floats(const MatmulParams& p, int n_threads);
// `ws` must hold matmul_workspace_floats floats.
void matmul(const MatmulParams& p, float* ws, ThreadPool& pool);
// The specification: plain loops, double accumulation. Single-threaded.
void matmul_ref(const MatmulParams& p);

// Row-block kernels (internal; one per ISA). Compute rows [n0, n1) of y for all T tokens.
void gemm_rows_scalar(const MatmulParams& p, int64_t n0, int64_t n1);
void gemm_rows_avx2(const MatmulParams& p, int64_t n0, int64_t n1);
void gemm_rows_avx512(const MatmulParams& p, int64_t n0, int64_t n1);

}  // namespace atmoe::cpu
