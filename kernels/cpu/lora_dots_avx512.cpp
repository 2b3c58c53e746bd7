// The LoRA shrink of a few tokens on AVX-512 (lora_dots, lora.h): RB rows × TB tokens, one
// zmm accumulator each, 16 k at a time (bf16 widened by a 16-bit shift; the last k masked),
// then a horizontal sum. Every (row, token) sum is formed in the same order whatever RB and
// TB are. Built with -mavx512f/bw/vl/dq; called only when the CPU has them.
#include <immintrin.h>

#include "kernels/cpu/lora.h"

namespace atmoe::cpu {
namespace {

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
  // The rows' lines 8 ahead of the loads (a decode call finds them in DRAM: RB short
  // streams that the hardware prefetcher picks up late), once per line, within each row.
  constexpr int64_t kLine = BF16 ? 32 : 16, kAhead = 8 * kLine;
  for (; k + 16 <= p.K; k += 16) {
    if ((k & (kLine - 1)) == 0 && k + kAhead < p.K)
      for (int i = 0; i < RB; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(a + size_t(i) * row_bytes + size_t(k + kAhead) * (BF16 ? 2 : 4)),
                     _MM_HINT_T0);
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

void lora_dots_avx512(const LoraDotsParams& p) {
  if (p.dtype == DType::BF16) dots<true>(p);
  else dots<false>(p);
}

}  // namespace atmoe::cpu
