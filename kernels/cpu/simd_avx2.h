// Helpers shared by the AVX2 kernel files (gemm_avx2.cpp, lora_dots_avx2.cpp). Include only
// from files built with -mavx2 -mfma (kernels/CMakeLists.txt).
#pragma once
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

namespace atmoe::cpu::avx2 {

// 8 weights from element off of w as f32: bf16 widened by a 16-bit shift, or f32 as is.
template <bool BF16>
inline __m256 load8(const void* w, size_t off) {
  if constexpr (BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + off));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(w) + off);
  }
}

}  // namespace atmoe::cpu::avx2
