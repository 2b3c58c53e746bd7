#include "kernels/cpu/attention.h"

#include <cmath>
#include <vector>

#include "common/error.h"
#include "kernels/thread_pool.h"

namespace atmoe::cpu {

__attribute__((target_clones("avx512f", "avx2", "default")))
static float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

int64_t attention_workspace_floats(const AttentionParams& p, int n_threads) { return int64_t(n_threads) * p.max_ctx; }

void attention(const AttentionParams& p, float* ws, ThreadPool& pool) {
  ATMOE_ASSERT(p.Hq % p.Hkv == 0);
  // Flatten (sequence row, head) work items.
  int64_t total = 0;
  for (int64_t s = 0; s < p.n_seqs; ++s) total += p.seqs[s].T;
  const int64_t items = total * p.Hq, group = p.Hq / p.Hkv, ldkv = p.Hkv * p.D;
  pool.run([&](int tid, int nt) {
    float* sc = ws + int64_t(tid) * p.max_ctx;
    int64_t per = (items + nt - 1) / nt, b = tid * per, e = std::min(items, b + per);
    int64_t s = 0, base = 0;  // find the sequence of item b
    for (int64_t it = b; it < e; ++it) {
      int64_t row = it / p.Hq, h = it % p.Hq;
      while (row >= base + p.seqs[s].T) base += p.seqs[s++].T;
      const AttentionSeq& q = p.seqs[s];
      int64_t t = row - base, n = int64_t(q.pos[t]) + 1, kvh = h / group;
      ATMOE_ASSERT(n <= p.max_ctx);
      const float* qv = p.q + (q.t0 + t) * p.ldq + h * p.D;
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = dot(qv, q.k + j * ldkv + kvh * p.D, p.D) * p.scale;
        m = std::max(m, sc[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += (sc[j] = std::exp(sc[j] - m));
      float inv = 1.f / sum;
      float* o = p.out + (q.t0 + t) * p.ldo + h * p.D;
      for (int64_t d = 0; d < p.D; ++d) o[d] = 0.f;
      for (int64_t j = 0; j < n; ++j) axpy(o, sc[j] * inv, q.v + j * ldkv + kvh * p.D, p.D);
    }
  });
}

void attention_ref(const AttentionParams& p) {
  const int64_t group = p.Hq / p.Hkv, ldkv = p.Hkv * p.D;
  for (int64_t s = 0; s < p.n_seqs; ++s) {
    const AttentionSeq& q = p.seqs[s];
    for (int64_t t = 0; t < q.T; ++t)
      for (int64_t h = 0; h < p.Hq; ++h) {
        int64_t n = int64_t(q.pos[t]) + 1, kvh = h / group;
        const float* qv = p.q + (q.t0 + t) * p.ldq + h * p.D;
        std::vector<double> sc(static_cast<size_t>(n));
        double m = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          double d = 0;
          for (int64_t i = 0; i < p.D; ++i) d += double(qv[i]) * q.k[j * ldkv + kvh * p.D + i];
          sc[size_t(j)] = d * p.scale;
          m = std::max(m, sc[size_t(j)]);
        }
        double sum = 0;
        for (auto& x : sc) sum += (x = std::exp(x - m));
        for (int64_t i = 0; i < p.D; ++i) {
          double o = 0;
          for (int64_t j = 0; j < n; ++j) o += sc[size_t(j)] / sum * q.v[j * ldkv + kvh * p.D + i];
          p.out[(q.t0 + t) * p.ldo + h * p.D + i] = float(o);
        }
      }
  }
}

}  // namespace atmoe::cpu
