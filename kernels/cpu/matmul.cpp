#include "kernels/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <cstring>

#include "common/env.h"
#include "common/error.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/thread_pool.h"

namespace atmoe::cpu {

static constexpr int64_t kBlasRows = 1024;  // rows unpacked to f32 per sgemm call

void pack_weights(const float* w, int64_t N, int64_t K, DType dt, void* out) {
  ATMOE_ASSERT(dt == DType::F32 || dt == DType::BF16);
  const int64_t NP = packed_rows(N);
  for (int64_t n = 0; n < NP; ++n)
    for (int64_t k = 0; k < K; ++k) {
      float v = n < N ? w[n * K + k] : 0.f;
      size_t at = size_t(((n / kPanel) * K + k) * kPanel + n % kPanel);
      if (dt == DType::F32) static_cast<float*>(out)[at] = v;
      else static_cast<uint16_t*>(out)[at] = f32_to_bf16(v);
    }
}

float packed_at(const void* w, DType dt, int64_t K, int64_t n, int64_t k) {
  size_t at = size_t(((n / kPanel) * K + k) * kPanel + n % kPanel);
  return dt == DType::F32 ? static_cast<const float*>(w)[at] : bf16_to_f32(static_cast<const uint16_t*>(w)[at]);
}

float range_w_at(const MatmulParams& p, int64_t ri, int64_t k0, int64_t k1, int64_t n, int64_t k) {
  if (p.k_range_w) return packed_at(p.k_range_w[ri], p.w_dtype, k1 - k0, n, k - k0);
  return packed_at(p.w, p.w_dtype, p.K, n, k);
}

void matmul_ref(const MatmulParams& p) {
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t n = 0; n < p.N; ++n) {
      double acc = p.bias ? double(p.bias[n]) : 0.0;
      const int64_t nr = p.k_ranges ? p.n_k_ranges : 1;
      for (int64_t ri = 0; ri < nr; ++ri) {
        const int64_t k0 = p.k_ranges ? p.k_ranges[2 * ri] : 0, k1 = p.k_ranges ? p.k_ranges[2 * ri + 1] : p.K;
        for (int64_t k = k0; k < k1; ++k)
          acc += double(p.x[x_row(p, t) * p.ldx + k]) * double(range_w_at(p, ri, k0, k1, n, k));
      }
      float& y = p.y[y_row(p, t) * p.ldy + n];
      y = p.accumulate ? float(double(y) + acc) : float(acc);
    }
}

void gemm_panels_scalar(const MatmulParams& p, int64_t p0, int64_t p1) {
  for (int64_t n = p0 * kPanel; n < std::min(p.N, p1 * kPanel); ++n)
    for (int64_t t = 0; t < p.T; ++t) {
      float acc = 0.f;
      const float* x = p.x + x_row(p, t) * p.ldx;
      const int64_t nr = p.k_ranges ? p.n_k_ranges : 1;
      for (int64_t ri = 0; ri < nr; ++ri) {
        const int64_t k0 = p.k_ranges ? p.k_ranges[2 * ri] : 0, k1 = p.k_ranges ? p.k_ranges[2 * ri + 1] : p.K;
        for (int64_t k = k0; k < k1; ++k) acc += x[k] * range_w_at(p, ri, k0, k1, n, k);
      }
      acc += p.bias ? p.bias[n] : 0.f;
      float& y = p.y[y_row(p, t) * p.ldy + n];
      y = p.accumulate ? y + acc : acc;
    }
}

bool use_blas(int64_t T) {
  static const bool blas = [] {
    return env_str("ATMOE_PREFILL_GEMM") == "blas";  // the knob's declaration checks the value
  }();
  return blas && T >= kBlasMinTokens;
}

int64_t matmul_workspace_floats(const MatmulParams& p) {
  if (!use_blas(p.T)) return 0;
  return std::min(kBlasRows, packed_rows(p.N)) * p.K;
}

void matmul(const MatmulParams& p, float* ws, ThreadPool& pool) {
  ATMOE_ASSERT(p.w_dtype == DType::F32 || p.w_dtype == DType::BF16);
  ATMOE_ASSERT(p.ldx >= p.K && p.ldy >= p.N);
  if (p.T == 0 || p.N == 0) return;
  if (use_blas(p.T) && !p.k_ranges && !p.x_rows && !p.y_rows) {
    ATMOE_ASSERT(ws != nullptr);
    const float beta = p.accumulate ? 1.f : 0.f;
    for (int64_t n0 = 0; n0 < p.N; n0 += kBlasRows) {
      const int64_t nr = std::min(kBlasRows, p.N - n0);
      // Unpack rows [n0, n0 + nr) to row-major f32 [nr, K], panel by panel.
      pool.parallel_for((nr + kPanel - 1) / kPanel, [&](int64_t b, int64_t e) {
        for (int64_t pi = b; pi < e; ++pi) {
          const int64_t panel = n0 / kPanel + pi, rows = std::min(kPanel, nr - pi * kPanel);
          for (int64_t k = 0; k < p.K; ++k) {
            const size_t at = size_t((panel * p.K + k) * kPanel);
            float* dst = ws + pi * kPanel * p.K + k;
            if (p.w_dtype == DType::F32) {
              const float* src = static_cast<const float*>(p.w) + at;
              for (int64_t j = 0; j < rows; ++j) dst[j * p.K] = src[j];
            } else {
              const uint16_t* src = static_cast<const uint16_t*>(p.w) + at;
              for (int64_t j = 0; j < rows; ++j) dst[j * p.K] = bf16_to_f32(src[j]);
            }
          }
        }
      });
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(p.T), int(nr), int(p.K), 1.f, p.x, int(p.ldx), ws,
                  int(p.K), beta, p.y + n0, int(p.ldy));
    }
    if (p.bias)
      for (int64_t t = 0; t < p.T; ++t)
        for (int64_t n = 0; n < p.N; ++n) p.y[t * p.ldy + n] += p.bias[n];
    return;
  }
  matmul_simd(p, pool);
}

PanelKernel panel_kernel() {
  switch (best_isa()) {
    case Isa::Avx512: return gemm_panels_avx512;
    case Isa::Avx2: return gemm_panels_avx2;
    default: return gemm_panels_scalar;
  }
}

void matmul_simd(const MatmulParams& p, ThreadPool& pool) {
  if (p.T == 0 || p.N == 0) return;
  auto kern = panel_kernel();
  // Output panels in chunks claimed from a shared counter (a few per thread): a thread that
  // loses its core to another process computes fewer panels instead of holding the others.
  pool.parallel_for((p.N + kPanel - 1) / kPanel, [&](int64_t b, int64_t e) { kern(p, b, e); });
}

void matmul_panels(const MatmulParams& p, const std::vector<std::pair<int64_t, int64_t>>& panels, ThreadPool& pool) {
  if (p.T == 0 || panels.empty()) return;
  std::vector<int64_t> list;
  for (auto [a, b] : panels)
    for (int64_t i = a; i < b; ++i) list.push_back(i);
  auto kern = panel_kernel();
  pool.parallel_for(int64_t(list.size()), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) kern(p, list[size_t(i)], list[size_t(i)] + 1);
  });
}

}  // namespace atmoe::cpu
