#include "kernels/cpu/softmax.h"

#include <cmath>
#include <limits>

namespace atmoe::cpu {

template <class Real>
static void impl(float* x, int64_t R, int64_t C, float scale) {
  for (int64_t r = 0; r < R; ++r) {
    float* v = x + r * C;
    Real m = -std::numeric_limits<Real>::infinity();
    for (int64_t i = 0; i < C; ++i) m = std::max(m, Real(v[i]) * Real(scale));
    if (!std::isfinite(m)) {
      for (int64_t i = 0; i < C; ++i) v[i] = 0.f;
      continue;
    }
    Real sum = 0;
    for (int64_t i = 0; i < C; ++i) {
      Real e = std::exp(Real(v[i]) * Real(scale) - m);
      v[i] = float(e);
      sum += e;
    }
    Real inv = Real(1) / sum;
    for (int64_t i = 0; i < C; ++i) v[i] = float(Real(v[i]) * inv);
  }
}

void softmax_rows(float* x, int64_t R, int64_t C, float scale) { impl<float>(x, R, C, scale); }
void softmax_rows_ref(float* x, int64_t R, int64_t C, float scale) { impl<double>(x, R, C, scale); }

}  // namespace atmoe::cpu
