// AVX2+FMA GEMV/GEMM over packed panels (matmul.h): one panel of 32 output rows = 4 ymm,
// a tile of TB = 2 tokens -> 8 accumulators (one token: two panels at a time); bf16 widened
// by a 16-bit shift.
// Prefill (T >= kWideMinTokens, no k ranges): the TB = 2 tile leaves the FMA units idle
// half the time (measured: 30% of peak, 75% of prefill time in it). There each panel is
// first widened to f32 in two halves of 16 outputs ([2][K][16], per-thread buffer, cache
// resident), and tiles of 6 tokens x 16 outputs stream it: 12 accumulators + 2 weights +
// 1 broadcast = 15 of the 16 ymm, 12 FMAs per 8 loads.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "common/prefetch.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/simd_avx2.h"

namespace atmoe::cpu {
namespace {

using avx2::load8;

// Token row t's outputs n0 .. n0 + 8·NQ − 1 from NQ accumulators, bias and the prior y added
// as asked; a panel's last rows (fewer than 8·NQ) one by one.
template <int NQ>
__attribute__((always_inline)) inline void store_outputs(const MatmulParams& p, int64_t t, int64_t n0, int64_t rows,
                                                         const __m256 (&acc)[NQ]) {
  float* y = p.y + y_row(p, t) * p.ldy + n0;
  if (rows == 8 * NQ) {  // vector stores (a LoRA expand of rank 8 is mostly stores)
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) {
      __m256 v = acc[q];
      if (p.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(p.bias + n0 + 8 * q));
      if (p.accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(y + 8 * q));
      _mm256_storeu_ps(y + 8 * q, v);
    }
    return;
  }
  alignas(32) float out[8 * NQ];
#pragma GCC unroll 4
  for (int q = 0; q < NQ; ++q) _mm256_store_ps(out + 8 * q, acc[q]);
  for (int64_t r = 0; r < rows; ++r) {
    const float v = out[r] + (p.bias ? p.bias[n0 + r] : 0.f);
    y[r] = p.accumulate ? y[r] + v : v;
  }
}

// TB tokens x NP consecutive panels: TB × NP × 4 accumulators. NP = 2 for a single token
// (decode, LoRA expands): its 4 chains alone would wait on the FMA latency. Each output's
// sum is formed in the same order whatever TB and NP are.
template <bool BF16, int TB, int NP>
void tile(const MatmulParams& p, int64_t panel, int64_t t0) {
  bool gemv_ahead = false;  // a base GEMV on a CPU where prefetching its rows ahead pays (matmul.h)
  if constexpr (TB <= 3) gemv_ahead = !p.k_range_w && gemv_prefetch();
  __m256 acc[TB][NP][4];
#pragma GCC unroll 8
  for (int j = 0; j < TB; ++j)
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[j][q][c] = _mm256_setzero_ps();
  const float* xr[TB];
#pragma GCC unroll 8
  for (int j = 0; j < TB; ++j) xr[j] = p.x + x_row(p, t0 + j) * p.ldx;
  const int64_t nranges = p.k_ranges ? p.n_k_ranges : 1;
  for (int64_t ri = 0; ri < nranges; ++ri) {
    const int64_t k0 = p.k_ranges ? p.k_ranges[2 * ri] : 0, k1 = p.k_ranges ? p.k_ranges[2 * ri + 1] : p.K;
    // Weights of this range: the matrix's k rows, or (k_range_w) a packed matrix of its own.
    const void* wr = p.k_range_w ? p.k_range_w[ri] : p.w;
    const int64_t kb = p.k_range_w ? k0 : 0;
    const size_t stride = size_t(p.k_range_w ? k1 - k0 : p.K) * kPanel;  // one panel's elements
    const size_t base = size_t(panel) * stride;
    // A LoRA expand's B_b (a few rank rows a panel, found cold in a decode step): the next
    // tile's lines in flight while this one computes (once per panel, by its first tokens;
    // only panels that exist).
    if (p.k_range_w && t0 == 0) {
      constexpr size_t es = BF16 ? 2 : 4;
      const int64_t next = std::min<int64_t>(NP, (p.N + kPanel - 1) / kPanel - panel - NP);
      if (next > 0) prefetch_lines(static_cast<const char*>(wr) + (base + NP * stride) * es, size_t(next) * stride * es);
    }
    for (int64_t k = k0; k < k1; ++k) {
      if constexpr (TB <= 3)  // decode: a base GEMV (matmul.h)
        if (gemv_ahead && k + kGemvAhead < k1) prefetch_gemv_rows<BF16>(wr, base, stride, k - kb, NP);
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q) {
        __m256 w[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c)
          w[c] = load8<BF16>(wr, base + size_t(q) * stride + size_t(k - kb) * kPanel + size_t(8 * c));
#pragma GCC unroll 8
        for (int j = 0; j < TB; ++j) {
          const __m256 xb = _mm256_broadcast_ss(xr[j] + k);
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) acc[j][q][c] = _mm256_fmadd_ps(w[c], xb, acc[j][q][c]);
        }
      }
    }
  }
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) {
    const int64_t n0 = (panel + q) * kPanel, rows = std::min<int64_t>(kPanel, p.N - n0);
#pragma GCC unroll 8
    for (int j = 0; j < TB; ++j) store_outputs<4>(p, t0 + j, n0, rows, acc[j][q]);
  }
}

constexpr int64_t kWideMinTokens = 32;

// The panel's weights as f32, outputs in two halves of 16: wf[h][k][16].
template <bool BF16>
void widen_panel(const MatmulParams& p, int64_t panel, float* wf) {
  const size_t base = size_t(panel * p.K) * kPanel;
  for (int64_t k = 0; k < p.K; ++k)
    for (int h = 0; h < 2; ++h) {
      float* d = wf + (size_t(h) * size_t(p.K) + size_t(k)) * 16;
      _mm256_storeu_ps(d, load8<BF16>(p.w, base + size_t(k) * kPanel + size_t(16 * h)));
      _mm256_storeu_ps(d + 8, load8<BF16>(p.w, base + size_t(k) * kPanel + size_t(16 * h + 8)));
    }
}

// TB tokens x 16 outputs (n0 .. n0 + 15) from one widened half wh ([K][16]).
template <int TB>
void tile16(const MatmulParams& p, const float* wh, int64_t n0, int64_t t0) {
  __m256 acc[TB][2];
#pragma GCC unroll 8
  for (int j = 0; j < TB; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  const float* xr[TB];
#pragma GCC unroll 8
  for (int j = 0; j < TB; ++j) xr[j] = p.x + x_row(p, t0 + j) * p.ldx;
  for (int64_t k = 0; k < p.K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(wh + k * 16), w1 = _mm256_loadu_ps(wh + k * 16 + 8);
#pragma GCC unroll 8
    for (int j = 0; j < TB; ++j) {
      const __m256 xb = _mm256_broadcast_ss(xr[j] + k);
      acc[j][0] = _mm256_fmadd_ps(w0, xb, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(w1, xb, acc[j][1]);
    }
  }
  const int64_t rows = std::min<int64_t>(16, p.N - n0);
#pragma GCC unroll 8
  for (int j = 0; j < TB; ++j) store_outputs<2>(p, t0 + j, n0, rows, acc[j]);
}

template <bool BF16>
void panels(const MatmulParams& p, int64_t p0, int64_t p1) {
  if (p.T >= kWideMinTokens && !p.k_ranges) {
    static thread_local std::vector<float> wf;  // per pool thread, grown to the largest K once
    if (wf.size() < size_t(p.K) * kPanel) wf.resize(size_t(p.K) * kPanel);
    for (int64_t pn = p0; pn < p1; ++pn) {
      widen_panel<BF16>(p, pn, wf.data());
      for (int h = 0; h < 2; ++h) {
        const int64_t n0 = pn * kPanel + 16 * h;
        if (n0 >= p.N) break;
        const float* wh = wf.data() + size_t(h) * size_t(p.K) * 16;
        int64_t t = 0;
        for (; t + 6 <= p.T; t += 6) tile16<6>(p, wh, n0, t);
        switch (p.T - t) {
          case 5: tile16<5>(p, wh, n0, t); break;
          case 4: tile16<4>(p, wh, n0, t); break;
          case 3: tile16<3>(p, wh, n0, t); break;
          case 2: tile16<2>(p, wh, n0, t); break;
          case 1: tile16<1>(p, wh, n0, t); break;
          default: break;
        }
      }
    }
    return;
  }
  if (p.T == 1) {  // decode and LoRA expands: two panels at a time
    int64_t pn = p0;
    for (; pn + 2 <= p1; pn += 2) tile<BF16, 1, 2>(p, pn, 0);
    if (pn < p1) tile<BF16, 1, 1>(p, pn, 0);
    return;
  }
  for (int64_t pn = p0; pn < p1; ++pn) {
    int64_t t = 0;
    for (; t + 2 <= p.T; t += 2) tile<BF16, 2, 1>(p, pn, t);
    if (t < p.T) tile<BF16, 1, 1>(p, pn, t);
  }
}

}  // namespace

void gemm_panels_avx2(const MatmulParams& p, int64_t p0, int64_t p1) {
  if (p.w_dtype == DType::BF16) panels<true>(p, p0, p1);
  else panels<false>(p, p0, p1);
}

}  // namespace atmoe::cpu
