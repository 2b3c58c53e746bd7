// AVX-512 GEMV/GEMM for decode: a register tile of RB weight rows × TB tokens; each
// weight vector (16 lanes, bf16 widened to f32 by a 16-bit shift) is loaded once per
// tile and used TB times; accumulation in f32. Built with -mavx512f/bw/vl/dq; only
// called when the CPU has them (cpu_features.cpp).
#include <immintrin.h>

#include "kernels/cpu/matmul.h"

namespace atmoe::cpu {
namespace {

template <bool BF16>
inline __m512 loadw(const void* w, int64_t off) {
  if constexpr (BF16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(w) + off);
  }
}
template <bool BF16>
inline __m512 loadw_mask(const void* w, int64_t off, __mmask16 m) {
  if constexpr (BF16) {
    __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + off);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(w) + off);
  }
}

template <bool BF16, int RB, int TB>
void tile(const MatmulParams& p, int64_t n, int64_t t) {
  __m512 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < TB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t K = p.K, kmain = K & ~int64_t(15);
  const float* x0 = p.x + t * p.ldx;
  for (int64_t k = 0; k < kmain; k += 16) {
    __m512 w[RB];
    for (int r = 0; r < RB; ++r) w[r] = loadw<BF16>(p.w, (n + r) * K + k);
    for (int j = 0; j < TB; ++j) {
      __m512 x = _mm512_loadu_ps(x0 + j * p.ldx + k);
      for (int r = 0; r < RB; ++r) acc[r][j] = _mm512_fmadd_ps(w[r], x, acc[r][j]);
    }
  }
  if (kmain < K) {
    __mmask16 m = __mmask16((1u << (K - kmain)) - 1);
    __m512 w[RB];
    for (int r = 0; r < RB; ++r) w[r] = loadw_mask<BF16>(p.w, (n + r) * K + kmain, m);
    for (int j = 0; j < TB; ++j) {
      __m512 x = _mm512_maskz_loadu_ps(m, x0 + j * p.ldx + kmain);
      for (int r = 0; r < RB; ++r) acc[r][j] = _mm512_fmadd_ps(w[r], x, acc[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < TB; ++j) {
      float v = _mm512_reduce_add_ps(acc[r][j]) + (p.bias ? p.bias[n + r] : 0.f);
      float& y = p.y[(t + j) * p.ldy + n + r];
      y = p.accumulate ? y + v : v;
    }
}

template <bool BF16, int RB>
void row_block(const MatmulParams& p, int64_t n) {
  int64_t t = 0;
  for (; t + 4 <= p.T; t += 4) tile<BF16, RB, 4>(p, n, t);
  switch (p.T - t) {
    case 3: tile<BF16, RB, 3>(p, n, t); break;
    case 2: tile<BF16, RB, 2>(p, n, t); break;
    case 1: tile<BF16, RB, 1>(p, n, t); break;
    default: break;
  }
}

template <bool BF16>
void rows(const MatmulParams& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) row_block<BF16, 4>(p, n);
  for (; n < n1; ++n) row_block<BF16, 1>(p, n);
}

}  // namespace

void gemm_rows_avx512(const MatmulParams& p, int64_t n0, int64_t n1) {
  if (p.w_dtype == DType::BF16) rows<true>(p, n0, n1);
  else rows<false>(p, n0, n1);
}

}  // namespace atmoe::cpu
