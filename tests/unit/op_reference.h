// Float64 references written from the definitions (DESIGN.md 1.2, kernels/ops.h), shared
// by the op tests of every backend (test_backend_ops.cpp, test_ops.cpp CpuSpec*,
// tests/gpu/test_cuda_paths.cpp). They read plain row-major inputs, never a kernel's layout.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace atmoe::test {

// Causal GQA attention of one query row at position P over cache rows 0..P:
//   q: [Hq, D]; k, v: [P + 1, Hkv, D] (row stride ldkv); out: [Hq, D].
inline void attention_row_f64(const float* q, const float* k, const float* v, int64_t ldkv, int64_t Hq, int64_t Hkv,
                              int64_t D, int64_t P, double scale, float* out) {
  std::vector<double> s(static_cast<size_t>(P + 1));
  for (int64_t h = 0; h < Hq; ++h) {
    const int64_t kh = h / (Hq / Hkv);
    double m = -1e300, z = 0;
    for (int64_t p = 0; p <= P; ++p) {
      double d = 0;
      for (int64_t i = 0; i < D; ++i) d += double(q[h * D + i]) * k[p * ldkv + kh * D + i];
      m = std::max(m, s[size_t(p)] = d * scale);
    }
    for (auto& e : s) z += (e = std::exp(e - m));
    for (int64_t i = 0; i < D; ++i) {
      double o = 0;
      for (int64_t p = 0; p <= P; ++p) o += s[size_t(p)] * v[p * ldkv + kh * D + i];
      out[h * D + i] = float(o / z);
    }
  }
}

// T-REX rank-1 experts on one token (the released code's formula, c_p = 32, c_s = 4):
//   u = A x, p = softmax(W_r x), g = 32 ω' p + 4 (1 − ω') s, G = reshape(g, r1 × r2)
//   (diagonal: G = diag(g)), y += gate · B (Gᵀ u).
//   x: [d_in]; A: [r1, d_in]; Wr: [E, d_in]; B: [d_out, r2]; s: [E] (nullptr = 0); y: [d_out].
inline void trex_row_f64(const float* x, const float* A, const float* Wr, const float* B, int64_t d_in, int64_t d_out,
                         int64_t r1, int64_t r2, int64_t E, bool diagonal, double omega, const float* s, double gate,
                         float* y) {
  std::vector<double> u(static_cast<size_t>(r1), 0.0), lg(static_cast<size_t>(E), 0.0), v(static_cast<size_t>(r2), 0.0);
  for (int64_t i = 0; i < r1; ++i)
    for (int64_t k = 0; k < d_in; ++k) u[size_t(i)] += double(A[i * d_in + k]) * x[k];
  double mx = -1e300, z = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t k = 0; k < d_in; ++k) lg[size_t(e)] += double(Wr[e * d_in + k]) * x[k];
    mx = std::max(mx, lg[size_t(e)]);
  }
  for (double l : lg) z += std::exp(l - mx);
  auto g = [&](int64_t e) {
    return 32.0 * omega * std::exp(lg[size_t(e)] - mx) / z + 4.0 * (1 - omega) * (s ? s[e] : 0.0);
  };
  for (int64_t b = 0; b < r2; ++b)
    for (int64_t a = 0; a < r1; ++a)
      if (!diagonal)
        v[size_t(b)] += g(a * r2 + b) * u[size_t(a)];
      else if (a == b)
        v[size_t(b)] = g(a) * u[size_t(a)];
  for (int64_t n = 0; n < d_out; ++n) {
    double acc = 0;
    for (int64_t b = 0; b < r2; ++b) acc += double(B[n * r2 + b]) * v[size_t(b)];
    y[n] += float(gate * acc);
  }
}

}  // namespace atmoe::test
