// Element types and scalar conversions. bf16 is stored as the upper 16 bits of an
// IEEE f32 (round-to-nearest-even on conversion); f16 is IEEE half.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace atmoe {

enum class DType : uint8_t { F32, F16, BF16, I32, I64, U8 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Bulk conversions used at load time.
void convert_to_f32(DType src, const void* in, float* out, size_t n);
void f32_to_bf16_n(const float* in, uint16_t* out, size_t n);

}  // namespace atmoe
