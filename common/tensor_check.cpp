#include "common/tensor_check.h"

#include <cfloat>
#include <cmath>
#include <cstring>

#include "common/error.h"

namespace atmoe {

namespace {
template <class Load>
void scan(int64_t n, Load load, const std::string& file, const std::string& name) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = load(i);
    if (std::isfinite(x)) continue;
    ATMOE_INPUT_ERROR("{}: tensor '{}' holds {} at index {} (weights must be finite)", file, name,
                      std::isnan(x) ? "NaN" : (x > 0 ? "+Inf" : "-Inf"), i);
  }
}
}  // namespace

void check_finite(const Tensor& t, const std::string& file, const std::string& name) {
  const int64_t n = t.numel();
  ATMOE_CHECK_INPUT(t.is_contiguous(), "{}: tensor '{}' is not contiguous", file, name);
  switch (t.dtype()) {
    // Views into a safetensors/GGUF mapping may be unaligned: elements are loaded with memcpy.
    case DType::F32: {
      // Exponent bits all ones <=> NaN or Inf; an integer OR-reduction the compiler vectorises.
      const uint8_t* b = static_cast<const uint8_t*>(t.raw());
      uint32_t bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, b + 4 * i, 4);
        bad |= uint32_t((u & 0x7f800000u) == 0x7f800000u);
      }
      if (!bad) return;
      scan(
          n,
          [&](int64_t i) {
            float x;
            std::memcpy(&x, b + 4 * i, 4);
            return x;
          },
          file, name);
      return;
    }
    case DType::F16:
    case DType::BF16: {
      // Exponent bits all ones <=> NaN or Inf.
      const uint8_t* b = static_cast<const uint8_t*>(t.raw());
      const uint16_t mask = t.dtype() == DType::F16 ? 0x7c00 : 0x7f80;
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, b + 2 * i, 2);
        if ((h & mask) == mask) {
          const bool nan = (h & uint16_t(~mask & 0x7fff)) != 0;
          ATMOE_INPUT_ERROR("{}: tensor '{}' holds {} at index {} (weights must be finite)", file, name,
                            nan ? "NaN" : ((h & 0x8000) ? "-Inf" : "+Inf"), i);
        }
      }
      return;
    }
    default:
      ATMOE_INPUT_ERROR("{}: tensor '{}' has dtype {}, expected F32, F16 or BF16", file, name, dtype_name(t.dtype()));
  }
}

float max_abs_f32(const Tensor& t) {
  ATMOE_ASSERT(t.dtype() == DType::F32);
  float m = 0.f;
  const float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::fabs(p[i]));
  return m;
}

void check_lora_bound(double scale, const Tensor& A, const Tensor& B, const std::string& file,
                      const std::string& module) {
  ATMOE_CHECK_INPUT(std::isfinite(scale) && std::fabs(scale) <= FLT_MAX,
                    "{}: {}: LoRA scale {} (lora_alpha / r) is not finite in f32", file, module, scale);
  // The largest delta an input of magnitude 1 can receive. Past sqrt(FLT_MAX) (1.8e19) the
  // residual stream's squares overflow f32 in the next RMSNorm, and every later value is NaN:
  // such an adapter is refused here rather than generating garbage (lora_alpha 1e29 on
  // ordinary weights was not caught by a bound of FLT_MAX). Real adapters stay below ~1e4.
  const double bound =
      std::fabs(scale) * double(A.dim(0)) * double(max_abs_f32(B)) * double(max_abs_f32(A)) * double(A.dim(1));
  const double limit = std::sqrt(double(FLT_MAX));
  ATMOE_CHECK_INPUT(std::isfinite(bound) && bound <= limit,
                    "{}: {}: scale {:g} x rank {} x max|lora_B| {:g} x max|lora_A| {:g} x d_in {} = {:g}, more than "
                    "{:.2g} (its square overflows f32 in the next RMSNorm)",
                    file, module, scale, A.dim(0), max_abs_f32(B), max_abs_f32(A), A.dim(1), bound, limit);
}

}  // namespace atmoe
