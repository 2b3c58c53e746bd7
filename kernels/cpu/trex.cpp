#include "kernels/cpu/trex.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/error.h"
#include "kernels/cpu/matmul.h"
#include "kernels/thread_pool.h"

namespace atmoe::cpu {

int64_t trex_workspace_floats(const TrexParams& p) { return p.T * p.R + p.T * p.r2; }

void trex_apply(const TrexParams& p, ThreadPool& pool) {
  if (p.T == 0) return;
  ATMOE_ASSERT(p.R >= p.r1 + p.E && (!p.diagonal || (p.r1 == p.E && p.r2 == p.E)));
  float* uw = p.ws;               // [T, R]: u = A x | logits W_r x
  float* v = p.ws + p.T * p.R;    // [T, r2]: Gᵀ u
  MatmulParams s;
  s.x = p.x;
  s.ldx = p.ldx;
  s.w = p.AW;
  s.w_dtype = p.dtype;
  s.y = uw;
  s.ldy = p.R;
  s.T = p.T;
  s.N = p.R;
  s.K = p.d_in;
  s.x_rows = p.rows;  // u rows stay compact: token j at row j
  matmul_simd(s, pool);
  pool.parallel_for(p.T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float cp = float(kTrexTokenCoef) * p.omega[t], cs = float(kTrexTaskCoef) * (1.f - p.omega[t]);
      const float* u = uw + t * p.R;
      float* lg = uw + t * p.R + p.r1;  // softmax in place -> p
      float m = -INFINITY;
      for (int64_t e = 0; e < p.E; ++e) m = std::max(m, lg[e]);
      float z = 0.f;
      for (int64_t e = 0; e < p.E; ++e) z += (lg[e] = std::exp(lg[e] - m));
      const float inv = 1.f / z;
      const float* st = p.s ? p.s + t * p.E : nullptr;
      for (int64_t e = 0; e < p.E; ++e) lg[e] = cp * lg[e] * inv + (st ? cs * st[e] : 0.f);  // g
      float* vt = v + t * p.r2;
      if (p.diagonal) {
        for (int64_t j = 0; j < p.r2; ++j) vt[j] = lg[j] * u[j];
      } else {
        for (int64_t j = 0; j < p.r2; ++j) vt[j] = 0.f;
        for (int64_t i = 0; i < p.r1; ++i) {
          const float ui = u[i];
          const float* gi = lg + i * p.r2;  // G[i][:]
          for (int64_t j = 0; j < p.r2; ++j) vt[j] += gi[j] * ui;
        }
      }
      for (int64_t j = 0; j < p.r2; ++j) vt[j] *= p.gate;
    }
  });
  MatmulParams e;
  e.x = v;
  e.ldx = p.r2;
  e.w = p.B;
  e.w_dtype = p.dtype;
  e.y = p.y;
  e.ldy = p.ldy;
  e.T = p.T;
  e.N = p.d_out;
  e.K = p.r2;
  e.accumulate = true;
  e.y_rows = p.rows;
  matmul_simd(e, pool);
}

void trex_apply_ref(const TrexParams& p) {
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t row = p.rows ? p.rows[t] : t;
    const float* x = p.x + row * p.ldx;
    std::vector<double> u(static_cast<size_t>(p.r1)), lg(static_cast<size_t>(p.E));
    for (int64_t i = 0; i < p.r1; ++i) {
      double a = 0;
      for (int64_t k = 0; k < p.d_in; ++k) a += double(packed_at(p.AW, p.dtype, p.d_in, i, k)) * x[k];
      u[size_t(i)] = a;
    }
    double m = -INFINITY, z = 0;
    for (int64_t e = 0; e < p.E; ++e) {
      double a = 0;
      for (int64_t k = 0; k < p.d_in; ++k) a += double(packed_at(p.AW, p.dtype, p.d_in, p.r1 + e, k)) * x[k];
      lg[size_t(e)] = a;
      m = std::max(m, a);
    }
    for (auto& l : lg) z += (l = std::exp(l - m));
    std::vector<double> g(static_cast<size_t>(p.E));
    for (int64_t e = 0; e < p.E; ++e)
      g[size_t(e)] = kTrexTokenCoef * p.omega[t] * lg[size_t(e)] / z +
                     kTrexTaskCoef * (1.0 - p.omega[t]) * (p.s ? double(p.s[t * p.E + e]) : 0.0);
    std::vector<double> v(static_cast<size_t>(p.r2), 0.0);
    for (int64_t j = 0; j < p.r2; ++j) {
      if (p.diagonal) {
        v[size_t(j)] = g[size_t(j)] * u[size_t(j)];
      } else {
        for (int64_t i = 0; i < p.r1; ++i) v[size_t(j)] += g[size_t(i * p.r2 + j)] * u[size_t(i)];
      }
    }
    for (int64_t n = 0; n < p.d_out; ++n) {
      double a = 0;
      for (int64_t j = 0; j < p.r2; ++j) a += double(packed_at(p.B, p.dtype, p.r2, n, j)) * v[size_t(j)];
      p.y[row * p.ldy + n] = float(double(p.y[row * p.ldy + n]) + double(p.gate) * a);
    }
  }
}

}  // namespace atmoe::cpu
