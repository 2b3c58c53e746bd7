#include <cuda_runtime.h>

#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/util.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kKeys = 4;                      // keys per warp per step (independent loads in flight)
constexpr int kChunks = int(kAttnMaxD / 32);  // D elements per lane: i = lane + 32 c

struct AttnArgs {
  const float* q;
  int64_t ldq;
  float* out;
  int64_t ldo;
  int Hq, Hkv, D;
  float scale;
  const AttnSeqDev* seqs;
  const AttnRowDev* rows;
};

// Block (blockIdx.x = work row, blockIdx.y = query head h). Warp w takes the keys
// j = w*kKeys + s*kWarps*kKeys + u, u < kKeys, s = 0, 1, ...; lane holds q[i], acc[i] for
// i = lane + 32c < D.
__global__ void __launch_bounds__(kThreads) attention_kernel(AttnArgs a) {
  __shared__ float qs[kAttnMaxD];
  __shared__ float ms[kWarps], ls[kWarps];
  __shared__ float accs[kWarps][kAttnMaxD];
  const AttnRowDev rw = a.rows[blockIdx.x];
  const AttnSeqDev sq = a.seqs[rw.seq];
  const int h = blockIdx.y, D = a.D;
  const int kvh = h / (a.Hq / a.Hkv);
  const int64_t row = sq.t0 + rw.t;
  const int64_t n = int64_t(sq.pos[rw.t]) + 1;  // keys 0..pos inclusive
  const int64_t ldkv = int64_t(a.Hkv) * D;
  const float* qv = a.q + row * a.ldq + int64_t(h) * D;
  for (int i = threadIdx.x; i < D; i += kThreads) qs[i] = qv[i];
  __syncthreads();

  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  float qr[kChunks], acc[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int i = lane + 32 * c;
    qr[c] = i < D ? qs[i] : 0.f;
    acc[c] = 0.f;
  }
  const float* kb = sq.k + int64_t(kvh) * D;
  const float* vb = sq.v + int64_t(kvh) * D;
  float m = -INFINITY, l = 0.f;
  for (int64_t j0 = int64_t(w) * kKeys; j0 < n; j0 += int64_t(kWarps) * kKeys) {
    float d[kKeys];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      d[u] = 0.f;
      if (j0 + u < n) {  // the same for every lane
        const float* kr = kb + (j0 + u) * ldkv;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int i = lane + 32 * c;
          if (i < D) d[u] += qr[c] * kr[i];
        }
      }
    }
    float mn = m;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      d[u] = warp_sum(d[u]) * a.scale;
      if (j0 + u >= n) d[u] = -INFINITY;  // not a key: weight 0
      mn = fmaxf(mn, d[u]);
    }
    // Rescale what was accumulated under the old maximum; -inf guards keep exp(-inf - -inf)
    // (NaN) out when nothing has been seen yet.
    const float corr = m == -INFINITY ? 0.f : expf(m - mn);
    float pj[kKeys];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) pj[u] = d[u] == -INFINITY ? 0.f : expf(d[u] - mn);
    l *= corr;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) l += pj[u];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) acc[c] *= corr;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      if (j0 + u < n) {
        const float* vr = vb + (j0 + u) * ldkv;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int i = lane + 32 * c;
          if (i < D) acc[c] += pj[u] * vr[i];
        }
      }
    }
    m = mn;
  }

  // Merge the warps: out = Σ_w acc_w e^(m_w - M) / Σ_w l_w e^(m_w - M), M = max_w m_w.
  if (lane == 0) ms[w] = m, ls[w] = l;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int i = lane + 32 * c;
    if (i < D) accs[w][i] = acc[c];
  }
  __syncthreads();
  float M = -INFINITY;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) M = fmaxf(M, ms[k]);
  float f[kWarps], L = 0.f;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) {
    f[k] = ms[k] == -INFINITY ? 0.f : expf(ms[k] - M);
    L += ls[k] * f[k];
  }
  const float inv = 1.f / L;
  float* o = a.out + row * a.ldo + int64_t(h) * D;
  for (int i = threadIdx.x; i < D; i += kThreads) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += accs[k][i] * f[k];
    o[i] = s * inv;
  }
}

}  // namespace

int attention(const ops::AttentionParams& p, const AttnSeqDev* seqs, const AttnRowDev* rows, int64_t n_rows,
              void* stream) {
  if (n_rows <= 0 || p.Hq <= 0) return 0;
  if (p.D <= 0 || p.D > kAttnMaxD || p.Hkv <= 0 || p.Hq % p.Hkv != 0 || p.Hq > 65535 || n_rows > INT32_MAX)
    return int(cudaErrorInvalidValue);
  AttnArgs a{p.q, p.ldq, p.out, p.ldo, int(p.Hq), int(p.Hkv), int(p.D), p.scale, seqs, rows};
  attention_kernel<<<dim3(unsigned(n_rows), unsigned(p.Hq)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream)>>>(a);
  return int(cudaGetLastError());
}

}  // namespace atmoe::cuda
