#include "kernels/cpu/rmsnorm.h"

#include <cmath>

#include "kernels/thread_pool.h"

namespace atmoe::cpu {

static void rows(const RmsNormParams& p, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* x = p.x + t * p.ldx;
    float* y = p.y + t * p.ldy;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < p.D; ++i) ss += x[i] * x[i];
    float scale = 1.f / std::sqrt(ss / float(p.D) + p.eps);
    for (int64_t i = 0; i < p.D; ++i) y[i] = x[i] * scale * p.w[i];
  }
}

void rmsnorm(const RmsNormParams& p, ThreadPool* pool) {
  if (pool && p.T > 1) pool->parallel_for(p.T, [&](int64_t b, int64_t e) { rows(p, b, e); });
  else rows(p, 0, p.T);
}

void rmsnorm_ref(const RmsNormParams& p) {
  for (int64_t t = 0; t < p.T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < p.D; ++i) ss += double(p.x[t * p.ldx + i]) * p.x[t * p.ldx + i];
    double scale = 1.0 / std::sqrt(ss / double(p.D) + double(p.eps));
    for (int64_t i = 0; i < p.D; ++i) p.y[t * p.ldy + i] = float(double(p.x[t * p.ldx + i]) * scale * p.w[i]);
  }
}

}  // namespace atmoe::cpu
