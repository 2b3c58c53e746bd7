// AVX-512 GEMV/GEMM over packed panels (matmul.h): for one panel of 32 output rows and a
// tile of TB tokens, TB × 2 zmm accumulators; each k-step loads 32 weights (bf16 widened
// to f32 by a 16-bit shift), broadcasts x[t][k] and issues 2·TB FMAs. No horizontal sums:
// the accumulators are the outputs. Calls of 1 token take 4 panels at a time, of 2 or 3
// tokens 2 (decode, LoRA expands), so that the FMA chains hide their latency.
// Built with -mavx512f/bw/vl/dq; called only when the CPU has them (cpu_features.cpp).
#include <immintrin.h>

#include <algorithm>

#include "common/prefetch.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul.h"

namespace atmoe::cpu {
namespace {

template <bool BF16>
inline void load32(const void* w, size_t off, __m512& a, __m512& b) {
  if constexpr (BF16) {
    const __m512i h = _mm512_loadu_si512(static_cast<const uint16_t*>(w) + off);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
    b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
  } else {
    a = _mm512_loadu_ps(static_cast<const float*>(w) + off);
    b = _mm512_loadu_ps(static_cast<const float*>(w) + off + 16);
  }
}

// TB tokens x NP consecutive panels (panel .. panel + NP - 1): TB × NP × 2 accumulators.
// NP > 1 only for calls of T ≤ 3 tokens (decode, LoRA expands): a token's two chains per
// panel would leave the FMA units waiting on their latency; NP panels give 2·NP independent
// chains. Each output's sum is formed in the same order whatever TB and NP are.
template <bool BF16, int TB, int NP>
void tile(const MatmulParams& p, int64_t panel, int64_t t0) {
  bool gemv_ahead = false;  // a base GEMV on a CPU where prefetching its rows ahead pays (matmul.h)
  if constexpr (TB <= 3) gemv_ahead = !p.k_range_w && gemv_prefetch();
  __m512 acc[TB][NP][2];
  for (int j = 0; j < TB; ++j)
    for (int q = 0; q < NP; ++q) acc[j][q][0] = acc[j][q][1] = _mm512_setzero_ps();
  const float* xr[TB];
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
      __m512 w[NP][2];
      for (int q = 0; q < NP; ++q)
        load32<BF16>(wr, base + size_t(q) * stride + size_t(k - kb) * kPanel, w[q][0], w[q][1]);
      for (int j = 0; j < TB; ++j) {
        const __m512 xb = _mm512_set1_ps(xr[j][k]);
        for (int q = 0; q < NP; ++q) {
          acc[j][q][0] = _mm512_fmadd_ps(w[q][0], xb, acc[j][q][0]);
          acc[j][q][1] = _mm512_fmadd_ps(w[q][1], xb, acc[j][q][1]);
        }
      }
    }
  }
  for (int q = 0; q < NP; ++q) {
    const int64_t n0 = (panel + q) * kPanel, rows = std::min<int64_t>(kPanel, p.N - n0);
    const __mmask16 m0 = rows >= 16 ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
    const __mmask16 m1 = rows >= 32 ? __mmask16(0xffff) : rows > 16 ? __mmask16((1u << (rows - 16)) - 1) : __mmask16(0);
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (p.bias) {
      b0 = _mm512_maskz_loadu_ps(m0, p.bias + n0);
      b1 = _mm512_maskz_loadu_ps(m1, p.bias + n0 + 16);
    }
    for (int j = 0; j < TB; ++j) {
      float* y = p.y + y_row(p, t0 + j) * p.ldy + n0;
      __m512 r0 = _mm512_add_ps(acc[j][q][0], b0), r1 = _mm512_add_ps(acc[j][q][1], b1);
      if (p.accumulate) {
        r0 = _mm512_add_ps(r0, _mm512_maskz_loadu_ps(m0, y));
        r1 = _mm512_add_ps(r1, _mm512_maskz_loadu_ps(m1, y + 16));
      }
      _mm512_mask_storeu_ps(y, m0, r0);
      _mm512_mask_storeu_ps(y + 16, m1, r1);
    }
  }
}

// Panels [p0, p1) for TB = T tokens (T ≤ 3), NP panels at a time, then fewer.
template <bool BF16, int TB, int NP>
void few_tokens(const MatmulParams& p, int64_t p0, int64_t p1) {
  int64_t pn = p0;
  for (; pn + NP <= p1; pn += NP) tile<BF16, TB, NP>(p, pn, 0);
  if constexpr (NP > 1) few_tokens<BF16, TB, NP / 2>(p, pn, p1);
}

template <bool BF16>
void panels(const MatmulParams& p, int64_t p0, int64_t p1) {
  switch (p.T) {  // decode and LoRA expands: NP panels at a time
    case 1: few_tokens<BF16, 1, 4>(p, p0, p1); return;
    case 2: few_tokens<BF16, 2, 2>(p, p0, p1); return;
    case 3: few_tokens<BF16, 3, 2>(p, p0, p1); return;
    default: break;
  }
  // Tiles of 12 tokens (24 accumulators + 2 weight vectors + 1 broadcast of 32 zmm),
  // then 6, then the rest.
  for (int64_t pn = p0; pn < p1; ++pn) {
    int64_t t = 0;
    for (; t + 12 <= p.T; t += 12) tile<BF16, 12, 1>(p, pn, t);
    for (; t + 6 <= p.T; t += 6) tile<BF16, 6, 1>(p, pn, t);
    switch (p.T - t) {
      case 5: tile<BF16, 5, 1>(p, pn, t); break;
      case 4: tile<BF16, 4, 1>(p, pn, t); break;
      case 3: tile<BF16, 3, 1>(p, pn, t); break;
      case 2: tile<BF16, 2, 1>(p, pn, t); break;
      case 1: tile<BF16, 1, 1>(p, pn, t); break;
      default: break;
    }
  }
}

}  // namespace

void gemm_panels_avx512(const MatmulParams& p, int64_t p0, int64_t p1) {
  if (p.w_dtype == DType::BF16) panels<true>(p, p0, p1);
  else panels<false>(p, p0, p1);
}

}  // namespace atmoe::cpu
