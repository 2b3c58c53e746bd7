#include "kernels/cpu/rope.h"

#include <cmath>
#include <vector>

namespace atmoe::cpu {

template <class Real>
static void rope_impl(const RopeParams& p) {
  const int64_t half = p.D / 2;
  std::vector<Real> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
  for (int64_t t = 0; t < p.T; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      // Angle in double: positions up to 1e5+ times frequencies near 1 lose digits in f32.
      double a = double(p.pos[t]) * double(p.inv_freq[i]);
      c[size_t(i)] = Real(std::cos(a));
      s[size_t(i)] = Real(std::sin(a));
    }
    for (int64_t h = 0; h < p.H; ++h) {
      float* v = p.x + t * p.ldx + h * p.D;
      for (int64_t i = 0; i < half; ++i) {
        int64_t a = p.neox ? i : 2 * i, b = p.neox ? i + half : 2 * i + 1;
        Real x0 = v[a], x1 = v[b];
        v[a] = float(x0 * c[size_t(i)] - x1 * s[size_t(i)]);
        v[b] = float(x0 * s[size_t(i)] + x1 * c[size_t(i)]);
      }
    }
  }
}

void rope(const RopeParams& p) { rope_impl<float>(p); }
void rope_ref(const RopeParams& p) { rope_impl<double>(p); }

}  // namespace atmoe::cpu
