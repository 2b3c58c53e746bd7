// AVX-512 GEMV/GEMM over packed panels (matmul.h): for one panel of 32 output rows and a
// tile of TB tokens, TB × 2 zmm accumulators; each k-step loads 32 weights (bf16 widened
// to f32 by a 16-bit shift), broadcasts x[t][k] and issues 2·TB FMAs. No horizontal sums:
// the accumulators are the outputs. Fewer than 4 tokens (decode, LoRA expands): 4 or 2
// panels at a time, so that the FMA chains are independent enough to hide their latency.
// Also the LoRA shrink of a few tokens (lora_dots, lora.h). Built with -mavx512f/bw/vl/dq;
// called only when the CPU has them (cpu_features.cpp).
#include <immintrin.h>

#include <algorithm>

#include "kernels/cpu/lora.h"
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
// NP > 1 only for the few-token tail (T < 6): a token's two chains per panel would leave
// the FMA units waiting on their latency; NP panels give 2·NP independent chains. Each
// output's sum is formed in the same order whatever TB and NP are.
template <bool BF16, int TB, int NP>
void tile(const MatmulParams& p, int64_t panel, int64_t t0) {
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
    for (int64_t k = k0; k < k1; ++k) {
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

// Panels [p0, p1) for TB = T tokens (T < 6), NP panels at a time, then fewer.
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

// LoRA shrink of a few tokens (lora.h): RB rows × TB tokens, one zmm accumulator each,
// 16 k at a time (the last k masked), then a horizontal sum. Every (row, token) sum is
// formed in the same order whatever RB and TB are.
template <bool BF16>
inline __m512 load16(const void* a, int64_t k) {
  if constexpr (BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(a) + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(a) + k);
  }
}
template <bool BF16>
inline __m512 load16(const void* a, int64_t k, __mmask16 m) {
  if constexpr (BF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(a) + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(a) + k);
  }
}

template <bool BF16, int RB, int TB>
void dots_tile(const LoraDotsParams& p, int64_t i0, int64_t j0) {
  const size_t row_bytes = size_t(p.K) * (BF16 ? 2 : 4);
  const uint8_t* a = static_cast<const uint8_t*>(p.A) + size_t(i0) * row_bytes;
  const float* xr[TB];
  for (int j = 0; j < TB; ++j) xr[j] = p.x + int64_t(p.toks[j0 + j]) * p.ldx;
  __m512 acc[RB][TB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < TB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= p.K; k += 16) {
    __m512 xv[TB];
    for (int j = 0; j < TB; ++j) xv[j] = _mm512_loadu_ps(xr[j] + k);
    for (int i = 0; i < RB; ++i) {
      const __m512 w = load16<BF16>(a + size_t(i) * row_bytes, k);
      for (int j = 0; j < TB; ++j) acc[i][j] = _mm512_fmadd_ps(w, xv[j], acc[i][j]);
    }
  }
  if (k < p.K) {
    const __mmask16 m = __mmask16((1u << (p.K - k)) - 1);
    __m512 xv[TB];
    for (int j = 0; j < TB; ++j) xv[j] = _mm512_maskz_loadu_ps(m, xr[j] + k);
    for (int i = 0; i < RB; ++i) {
      const __m512 w = load16<BF16>(a + size_t(i) * row_bytes, k, m);
      for (int j = 0; j < TB; ++j) acc[i][j] = _mm512_fmadd_ps(w, xv[j], acc[i][j]);
    }
  }
  for (int j = 0; j < TB; ++j) {
    float* u = p.u + int64_t(p.toks[j0 + j]) * p.ldu + i0;
    for (int i = 0; i < RB; ++i) u[i] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

// Rows [i, rows) for tokens j0 .. j0 + TB - 1: RB rows at a time, then the rest.
template <bool BF16, int RB, int TB>
void dots_rows(const LoraDotsParams& p, int64_t i, int64_t j0) {
  for (; i + RB <= p.rows; i += RB) dots_tile<BF16, RB, TB>(p, i, j0);
  if constexpr (RB > 1)
    if (i < p.rows) dots_rows<BF16, RB / 2, TB>(p, i, j0);
}

template <bool BF16>
void dots(const LoraDotsParams& p) {
  int64_t j = 0;
  for (; j + 2 <= p.n_toks; j += 2) dots_rows<BF16, 4, 2>(p, 0, j);
  if (j < p.n_toks) dots_rows<BF16, 8, 1>(p, 0, j);
}

}  // namespace

void gemm_panels_avx512(const MatmulParams& p, int64_t p0, int64_t p1) {
  if (p.w_dtype == DType::BF16) panels<true>(p, p0, p1);
  else panels<false>(p, p0, p1);
}

void lora_dots_avx512(const LoraDotsParams& p) {
  if (p.dtype == DType::BF16) dots<true>(p);
  else dots<false>(p);
}

}  // namespace atmoe::cpu
