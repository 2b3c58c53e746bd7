#include "kernels/cpu/silu_mul.h"

#include <cmath>

#include "kernels/thread_pool.h"

namespace atmoe::cpu {

void silu_mul(const SiluMulParams& p, ThreadPool* pool) {
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t t = r / p.F, i = r % p.F;
      float g = p.g[t * p.ldg + i];
      p.out[t * p.ldo + i] = g / (1.f + std::exp(-g)) * p.u[t * p.ldu + i];
    }
  };
  int64_t n = p.T * p.F;
  if (pool && n >= 4096) pool->parallel_for(n, body, 1024);
  else body(0, n);
}

void silu_mul_ref(const SiluMulParams& p) {
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t i = 0; i < p.F; ++i) {
      double g = p.g[t * p.ldg + i];
      p.out[t * p.ldo + i] = float(g / (1.0 + std::exp(-g)) * double(p.u[t * p.ldu + i]));
    }
}

}  // namespace atmoe::cpu
