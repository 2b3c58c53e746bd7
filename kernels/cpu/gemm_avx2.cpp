// AVX2+FMA GEMV/GEMM for decode: register tile of 4 weight rows × 2 tokens, 8 lanes;
// bf16 widened by a 16-bit shift; f32 accumulation; scalar tail over K.
#include <immintrin.h>

#include "kernels/cpu/matmul.h"

namespace atmoe::cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool BF16>
inline __m256 loadw(const void* w, int64_t off) {
  if constexpr (BF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + off));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(w) + off);
  }
}
template <bool BF16>
inline float wscalar(const void* w, int64_t off) {
  if constexpr (BF16) return bf16_to_f32(static_cast<const uint16_t*>(w)[off]);
  else return static_cast<const float*>(w)[off];
}

template <bool BF16, int RB, int TB>
void tile(const MatmulParams& p, int64_t n, int64_t t) {
  __m256 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < TB; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K = p.K, kmain = K & ~int64_t(7);
  const float* x0 = p.x + t * p.ldx;
  for (int64_t k = 0; k < kmain; k += 8) {
    __m256 w[RB];
    for (int r = 0; r < RB; ++r) w[r] = loadw<BF16>(p.w, (n + r) * K + k);
    for (int j = 0; j < TB; ++j) {
      __m256 x = _mm256_loadu_ps(x0 + j * p.ldx + k);
      for (int r = 0; r < RB; ++r) acc[r][j] = _mm256_fmadd_ps(w[r], x, acc[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < TB; ++j) {
      float v = hsum(acc[r][j]);
      for (int64_t k = kmain; k < K; ++k) v += wscalar<BF16>(p.w, (n + r) * K + k) * x0[j * p.ldx + k];
      v += p.bias ? p.bias[n + r] : 0.f;
      float& y = p.y[(t + j) * p.ldy + n + r];
      y = p.accumulate ? y + v : v;
    }
}

template <bool BF16, int RB>
void row_block(const MatmulParams& p, int64_t n) {
  int64_t t = 0;
  for (; t + 2 <= p.T; t += 2) tile<BF16, RB, 2>(p, n, t);
  if (t < p.T) tile<BF16, RB, 1>(p, n, t);
}

template <bool BF16>
void rows(const MatmulParams& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) row_block<BF16, 4>(p, n);
  for (; n < n1; ++n) row_block<BF16, 1>(p, n);
}

}  // namespace

void gemm_rows_avx2(const MatmulParams& p, int64_t n0, int64_t n1) {
  if (p.w_dtype == DType::BF16) rows<true>(p, n0, n1);
  else rows<false>(p, n0, n1);
}

}  // namespace atmoe::cpu
