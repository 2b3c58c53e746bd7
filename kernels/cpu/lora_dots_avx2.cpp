// The LoRA shrink of a few tokens on AVX2+FMA (lora_dots, lora.h): RB rows × TB tokens, one
// ymm accumulator each, 8 k at a time (bf16 widened by a 16-bit shift), a horizontal sum,
// then the last K % 8 terms in order. Every (row, token) sum is formed in the same order
// whatever RB and TB are. Built with -mavx2 -mfma; called only when the CPU has them.
#include <immintrin.h>

#include <type_traits>

#include "kernels/cpu/lora.h"
#include "kernels/cpu/simd_avx2.h"

namespace atmoe::cpu {
namespace {

using avx2::load8;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool BF16, int RB, int TB>
void dots_tile(const LoraDotsParams& p, int64_t i0, int64_t j0) {
  using W = std::conditional_t<BF16, uint16_t, float>;
  const W* a = static_cast<const W*>(p.A) + i0 * p.K;
  const float* xr[TB];
#pragma GCC unroll 4
  for (int j = 0; j < TB; ++j) xr[j] = p.x + int64_t(p.toks[j0 + j]) * p.ldx;
  __m256 acc[RB][TB];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < TB; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K8 = p.K / 8 * 8;
  // The rows' lines 8 ahead of the loads (a decode call finds them in DRAM: RB short
  // streams that the hardware prefetcher picks up late), once per line, within each row.
  constexpr int64_t kLine = 64 / int64_t(sizeof(W)), kAhead = 8 * kLine;
  for (int64_t k = 0; k < K8; k += 8) {
    if ((k & (kLine - 1)) == 0 && k + kAhead < p.K)
#pragma GCC unroll 8
      for (int i = 0; i < RB; ++i) _mm_prefetch(reinterpret_cast<const char*>(a + i * p.K + k + kAhead), _MM_HINT_T0);
    __m256 xv[TB];
#pragma GCC unroll 4
    for (int j = 0; j < TB; ++j) xv[j] = _mm256_loadu_ps(xr[j] + k);
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      const __m256 w = load8<BF16>(a + i * p.K, size_t(k));
#pragma GCC unroll 4
      for (int j = 0; j < TB; ++j) acc[i][j] = _mm256_fmadd_ps(w, xv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < TB; ++j) {
    float* u = p.u + int64_t(p.toks[j0 + j]) * p.ldu + i0;
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      float s = hsum(acc[i][j]);
      for (int64_t k = K8; k < p.K; ++k) {
        if constexpr (BF16) s += bf16_to_f32(a[i * p.K + k]) * xr[j][k];
        else s += a[i * p.K + k] * xr[j][k];
      }
      u[i] = s;
    }
  }
}

template <bool BF16, int RB, int TB>
void dots_rows(const LoraDotsParams& p, int64_t i, int64_t j0) {
  for (; i + RB <= p.rows; i += RB) dots_tile<BF16, RB, TB>(p, i, j0);
  if constexpr (RB > 1)
    if (i < p.rows) dots_rows<BF16, RB / 2, TB>(p, i, j0);
}

template <bool BF16>
void dots(const LoraDotsParams& p) {
  int64_t j = 0;
  for (; j + 4 <= p.n_toks; j += 4) dots_rows<BF16, 2, 4>(p, 0, j);
  for (; j + 2 <= p.n_toks; j += 2) dots_rows<BF16, 4, 2>(p, 0, j);
  if (j < p.n_toks) dots_rows<BF16, 8, 1>(p, 0, j);
}

}  // namespace

void lora_dots_avx2(const LoraDotsParams& p) {
  if (p.dtype == DType::BF16) dots<true>(p);
  else dots<false>(p);
}

}  // namespace atmoe::cpu
