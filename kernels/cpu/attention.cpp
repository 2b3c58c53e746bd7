#include "kernels/cpu/attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/error.h"
#include "kernels/cpu/matmul.h"
#include "kernels/thread_pool.h"

namespace atmoe::cpu {

// One work item = (query row, KV head): the `group` query heads that share the KV head
// are processed together so each K and V row is loaded once for all of them. Items are
// handed out by an atomic counter, heaviest (latest positions) first: causal rows differ
// in cost by the length of their context. The counter runs under run_dynamic: a pool
// thread that has lost its core is not waited for, the others take its items.
template <int G>
__attribute__((target_clones("avx512f", "avx2", "default")))
static void attend_item(const float* const* q, float* const* o, const float* k, const float* v, int64_t ldkv,
                        int64_t n, int64_t D, float scale, float* sc) {
  // sc: [G][n] scores, then probabilities.
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = k + j * ldkv;
    for (int g = 0; g < G; ++g) {
      const float* qg = q[g];
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < D; ++i) s += qg[i] * kr[i];
      sc[g * n + j] = s * scale;
    }
  }
  for (int g = 0; g < G; ++g) {
    float* s = sc + g * n;
    float m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
    for (int64_t i = 0; i < D; ++i) o[g][i] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* vr = v + j * ldkv;
    for (int g = 0; g < G; ++g) {
      const float w = sc[g * n + j];
      float* og = o[g];
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) og[i] += w * vr[i];
    }
  }
}

using AttendFn = void (*)(const float* const*, float* const*, const float*, const float*, int64_t, int64_t, int64_t,
                          float, float*);

static AttendFn attend_for_group(int64_t g) {
  switch (g) {
    case 1: return attend_item<1>;
    case 2: return attend_item<2>;
    case 3: return attend_item<3>;
    case 4: return attend_item<4>;
    case 5: return attend_item<5>;
    case 6: return attend_item<6>;
    case 7: return attend_item<7>;
    case 8: return attend_item<8>;
    default: return nullptr;
  }
}

// Prefill segments (T >= kGemmRows query rows) run as two GEMMs per head on the SIMD
// panel kernel: S = Q_h K^T over the whole context (causal entries masked after the
// fact; at most 2x the FLOPs of an exact causal loop, at GEMM speed), then O_h = P V.
// K is packed once per KV head as a [n, D] weight, V as V^T: [D, n].
static constexpr int64_t kGemmRows = 16;

static int64_t max_gemm_segment(const AttentionParams& p, int64_t* n_max) {
  int64_t t = 0;
  *n_max = 0;
  for (int64_t s = 0; s < p.n_seqs; ++s)
    if (p.seqs[s].T >= kGemmRows) {
      t = std::max(t, p.seqs[s].T);
      *n_max = std::max(*n_max, int64_t(p.seqs[s].pos[p.seqs[s].T - 1]) + 1);
    }
  return t;
}

int64_t attention_workspace_floats(const AttentionParams& p, int n_threads) {
  int64_t n = 0, T = max_gemm_segment(p, &n);
  int64_t gemm = T ? int64_t(packed_elems(n, p.D) + packed_elems(p.D, n)) + T * n : 0;
  return int64_t(n_threads) * p.max_ctx * (p.Hq / p.Hkv) + gemm;
}

static void attention_segment_gemm(const AttentionParams& p, const AttentionSeq& q, float* ws, ThreadPool& pool) {
  const int64_t T = q.T, n = int64_t(q.pos[T - 1]) + 1, D = p.D, ldkv = p.Hkv * D, group = p.Hq / p.Hkv;
  float* kp = ws;
  float* vp = kp + packed_elems(n, D);
  float* S = vp + packed_elems(D, n);
  std::vector<float> tmp;
  for (int64_t kvh = 0; kvh < p.Hkv; ++kvh) {
    // Pack K [n, D] and V^T [D, n] of this KV head (f32 panels).
    pool.parallel_for((n + kPanel - 1) / kPanel, [&](int64_t b, int64_t e) {
      for (int64_t pn = b; pn < e; ++pn)
        for (int64_t k = 0; k < D; ++k)
          for (int64_t j = 0; j < kPanel; ++j) {
            int64_t r = pn * kPanel + j;
            kp[(pn * D + k) * kPanel + j] = r < n ? q.k[r * ldkv + kvh * D + k] : 0.f;
          }
    });
    pool.parallel_for((D + kPanel - 1) / kPanel, [&](int64_t b, int64_t e) {
      for (int64_t pn = b; pn < e; ++pn)
        for (int64_t k = 0; k < n; ++k)
          for (int64_t j = 0; j < kPanel; ++j) {
            int64_t r = pn * kPanel + j;
            vp[(pn * n + k) * kPanel + j] = r < D ? q.v[k * ldkv + kvh * D + r] : 0.f;
          }
    });
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kvh * group + g;
      MatmulParams sp;
      sp.x = p.q + q.t0 * p.ldq + h * D;
      sp.ldx = p.ldq;
      sp.w = kp;
      sp.w_dtype = DType::F32;
      sp.y = S;
      sp.ldy = n;
      sp.T = T;
      sp.N = n;
      sp.K = D;
      matmul_simd(sp, pool);
      // Scale, causal mask (row t sees keys 0..pos[t]), softmax.
      pool.parallel_for(T, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          float* r = S + t * n;
          const int64_t valid = int64_t(q.pos[t]) + 1;
          float m = -INFINITY;
          for (int64_t j = 0; j < valid; ++j) m = std::max(m, r[j] *= p.scale);
          float sum = 0.f;
          for (int64_t j = 0; j < valid; ++j) sum += (r[j] = std::exp(r[j] - m));
          const float inv = 1.f / sum;
          for (int64_t j = 0; j < valid; ++j) r[j] *= inv;
          for (int64_t j = valid; j < n; ++j) r[j] = 0.f;
        }
      });
      MatmulParams op;
      op.x = S;
      op.ldx = n;
      op.w = vp;
      op.w_dtype = DType::F32;
      op.y = p.out + q.t0 * p.ldo + h * D;
      op.ldy = p.ldo;
      op.T = T;
      op.N = D;
      op.K = n;
      matmul_simd(op, pool);
    }
  }
}

void attention(const AttentionParams& p, float* ws, ThreadPool& pool) {
  ATMOE_ASSERT(p.Hq % p.Hkv == 0);
  const int64_t group = p.Hq / p.Hkv, ldkv = p.Hkv * p.D;
  // Split very large groups into chunks of at most 8 heads.
  const int64_t gchunk = std::min<int64_t>(group, 8), nchunks = (group + gchunk - 1) / gchunk;
  // Items ordered by descending cost: (sequence, row) pairs sorted by position.
  struct Row {
    int32_t s, t;
  };
  std::vector<Row> rows;
  float* gemm_ws = ws + int64_t(pool.size()) * p.max_ctx * group;
  for (int64_t s = 0; s < p.n_seqs; ++s) {
    if (p.seqs[s].T >= kGemmRows) {
      attention_segment_gemm(p, p.seqs[s], gemm_ws, pool);
      continue;
    }
    for (int64_t t = 0; t < p.seqs[s].T; ++t) rows.push_back({int32_t(s), int32_t(t)});
  }
  std::stable_sort(rows.begin(), rows.end(),
                   [&](const Row& a, const Row& b) { return p.seqs[a.s].pos[a.t] > p.seqs[b.s].pos[b.t]; });
  const int64_t items = int64_t(rows.size()) * p.Hkv * nchunks;
  std::atomic<int64_t> next{0};
  pool.run_dynamic([&](int tid, int) {
    float* sc = ws + int64_t(tid) * p.max_ctx * group;  // tid: unique among the running threads
    const float* qp[8];
    float* op[8];
    for (int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const Row r = rows[size_t(it / (p.Hkv * nchunks))];
      const int64_t kvh = (it / nchunks) % p.Hkv, c = it % nchunks;
      const AttentionSeq& q = p.seqs[r.s];
      const int64_t n = int64_t(q.pos[r.t]) + 1, row = q.t0 + r.t;
      ATMOE_ASSERT(n <= p.max_ctx);
      const int64_t h0 = kvh * group + c * gchunk, g = std::min(gchunk, group - c * gchunk);
      for (int64_t i = 0; i < g; ++i) {
        qp[i] = p.q + row * p.ldq + (h0 + i) * p.D;
        op[i] = p.out + row * p.ldo + (h0 + i) * p.D;
      }
      attend_for_group(g)(qp, op, q.k + kvh * p.D, q.v + kvh * p.D, ldkv, n, p.D, p.scale, sc);
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
