#include "kernels/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <cstring>

#include "common/error.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/thread_pool.h"

namespace atmoe::cpu {

static constexpr int64_t kPanelRows = 256;  // rows of bf16 W converted per sgemm call

static inline float wval(const MatmulParams& p, int64_t n, int64_t k) {
  if (p.w_dtype == DType::F32) return static_cast<const float*>(p.w)[n * p.K + k];
  return bf16_to_f32(static_cast<const uint16_t*>(p.w)[n * p.K + k]);
}

void matmul_ref(const MatmulParams& p) {
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t n = 0; n < p.N; ++n) {
      double acc = p.bias ? double(p.bias[n]) : 0.0;
      for (int64_t k = 0; k < p.K; ++k) acc += double(p.x[t * p.ldx + k]) * double(wval(p, n, k));
      float& y = p.y[t * p.ldy + n];
      y = p.accumulate ? float(double(y) + acc) : float(acc);
    }
}

void gemm_rows_scalar(const MatmulParams& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t t = 0; t < p.T; ++t) {
      float acc = p.bias ? p.bias[n] : 0.f;
      const float* x = p.x + t * p.ldx;
      for (int64_t k = 0; k < p.K; ++k) acc += x[k] * wval(p, n, k);
      float& y = p.y[t * p.ldy + n];
      y = p.accumulate ? y + acc : acc;
    }
}

int64_t matmul_workspace_floats(const MatmulParams& p, int n_threads) {
  (void)n_threads;
  if (p.T < kBlasMinTokens || p.w_dtype == DType::F32) return 0;
  return std::min(kPanelRows, p.N) * p.K;
}

void matmul(const MatmulParams& p, float* ws, ThreadPool& pool) {
  ATMOE_ASSERT(p.w_dtype == DType::F32 || p.w_dtype == DType::BF16);
  ATMOE_ASSERT(p.ldx >= p.K && p.ldy >= p.N);
  if (p.T == 0 || p.N == 0) return;
  if (p.T >= kBlasMinTokens) {
    const float beta = p.accumulate ? 1.f : 0.f;
    if (p.w_dtype == DType::F32) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(p.T), int(p.N), int(p.K), 1.f, p.x, int(p.ldx),
                  static_cast<const float*>(p.w), int(p.K), beta, p.y, int(p.ldy));
    } else {
      ATMOE_ASSERT(ws != nullptr);
      const uint16_t* w = static_cast<const uint16_t*>(p.w);
      for (int64_t n0 = 0; n0 < p.N; n0 += kPanelRows) {
        int64_t nr = std::min(kPanelRows, p.N - n0);
        pool.parallel_for(nr * p.K, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) ws[i] = bf16_to_f32(w[n0 * p.K + i]);
        }, 4096);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(p.T), int(nr), int(p.K), 1.f, p.x, int(p.ldx), ws,
                    int(p.K), beta, p.y + n0, int(p.ldy));
      }
    }
    if (p.bias)
      for (int64_t t = 0; t < p.T; ++t)
        for (int64_t n = 0; n < p.N; ++n) p.y[t * p.ldy + n] += p.bias[n];
    return;
  }
  auto kern = gemm_rows_scalar;
  switch (best_isa()) {
    case Isa::Avx512: kern = gemm_rows_avx512; break;
    case Isa::Avx2: kern = gemm_rows_avx2; break;
    default: break;
  }
  // Rows in multiples of 16 per chunk so each thread streams whole cache lines of W.
  pool.parallel_for(p.N, [&](int64_t b, int64_t e) { kern(p, b, e); }, 16);
}

}  // namespace atmoe::cpu
