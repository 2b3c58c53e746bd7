#include <cuda_runtime.h>

#include "kernels/cuda/trex.cuh"
#include "kernels/cuda/util.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kShrinkWarps = 4;
constexpr int kThreads = 256;

struct TrexArgs {
  ops::TrexParams p;
  float* uw;  // [T, R]
  float* v;   // [T, r2]
};

// Block (blockIdx.x = token j, blockIdx.y = group of kShrinkWarps rows); warp -> row r.
template <class W>
__global__ void __launch_bounds__(kShrinkWarps * 32) trex_shrink_kernel(TrexArgs a) {
  const ops::TrexParams& p = a.p;
  const int64_t j = blockIdx.x;
  const int64_t r = int64_t(blockIdx.y) * kShrinkWarps + (threadIdx.x >> 5);
  if (r >= p.r1 + p.E) return;
  const int lane = threadIdx.x & 31;
  const int64_t row = p.rows ? int64_t(p.rows[j]) : j;
  const float* x = p.x + row * p.ldx;
  const W* w = static_cast<const W*>(p.AW) + r * p.d_in;
  float d = 0.f;
  for (int64_t k = lane; k < p.d_in; k += 32) d += load_w(w, k) * x[k];
  d = warp_sum(d);
  if (lane == 0) a.uw[j * p.R + r] = d;
}

__global__ void __launch_bounds__(kThreads) trex_mix_kernel(TrexArgs a) {
  __shared__ float sh[32];
  const ops::TrexParams& p = a.p;
  const int64_t j = blockIdx.x;
  const float* u = a.uw + j * p.R;
  float* lg = a.uw + j * p.R + p.r1;  // logits -> g, in place
  float m = -INFINITY;
  for (int64_t e = threadIdx.x; e < p.E; e += blockDim.x) m = fmaxf(m, lg[e]);
  m = block_max(m, sh);
  float z = 0.f;
  for (int64_t e = threadIdx.x; e < p.E; e += blockDim.x) z += expf(lg[e] - m);
  z = block_sum(z, sh);  // its barriers order every read of the logits before the writes below
  const float inv = 1.f / z;
  const float om = p.omega[j];
  const float cp = float(ops::kTrexTokenCoef) * om, cs = float(ops::kTrexTaskCoef) * (1.f - om);
  const float* st = p.s ? p.s + j * p.E : nullptr;
  for (int64_t e = threadIdx.x; e < p.E; e += blockDim.x) lg[e] = cp * expf(lg[e] - m) * inv + (st ? cs * st[e] : 0.f);
  __syncthreads();  // g (global memory, this block's rows) visible to the whole block
  float* vt = a.v + j * p.r2;
  for (int64_t c = threadIdx.x; c < p.r2; c += blockDim.x) {
    float acc;
    if (p.diagonal) {
      acc = lg[c] * u[c];
    } else {
      acc = 0.f;
      for (int64_t i = 0; i < p.r1; ++i) acc += lg[i * p.r2 + c] * u[i];  // G[i][c] · u[i]
    }
    vt[c] = acc * p.gate;
  }
}

// Block (blockIdx.x = token j, blockIdx.y = chunk of kThreads outputs).
template <class W>
__global__ void __launch_bounds__(kThreads) trex_expand_kernel(TrexArgs a) {
  const ops::TrexParams& p = a.p;
  const int64_t j = blockIdx.x;
  const int64_t n = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (n >= p.d_out) return;
  const int64_t row = p.rows ? int64_t(p.rows[j]) : j;
  const W* b = static_cast<const W*>(p.B) + n * p.r2;
  const float* vt = a.v + j * p.r2;
  float acc = 0.f;
  for (int64_t i = 0; i < p.r2; ++i) acc += load_w(b, i) * vt[i];
  p.y[row * p.ldy + n] += acc;
}

}  // namespace

int trex(const ops::TrexParams& p, void* ws, void* stream) {
  if (p.T <= 0) return 0;
  const int64_t used = p.r1 + p.E;
  const int64_t shrink_y = (used + kShrinkWarps - 1) / kShrinkWarps, expand_y = (p.d_out + kThreads - 1) / kThreads;
  if (p.T > INT32_MAX || used > p.R || shrink_y > 65535 || expand_y > 65535 || !p.omega ||
      (p.diagonal && (p.r1 != p.E || p.r2 != p.E)))
    return int(cudaErrorInvalidValue);
  TrexArgs a{p, static_cast<float*>(ws), reinterpret_cast<float*>(static_cast<char*>(ws) + trex_v_offset(p))};
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch_wtype(p.dtype, [&](auto wtag) {
    using W = decltype(wtag);
    if (shrink_y > 0)
      trex_shrink_kernel<W><<<dim3(unsigned(p.T), unsigned(shrink_y)), dim3(kShrinkWarps * 32), 0, st>>>(a);
    int e = int(cudaGetLastError());
    if (e != 0) return e;
    trex_mix_kernel<<<dim3(unsigned(p.T)), dim3(kThreads), 0, st>>>(a);
    if ((e = int(cudaGetLastError())) != 0 || expand_y <= 0) return e;
    trex_expand_kernel<W><<<dim3(unsigned(p.T), unsigned(expand_y)), dim3(kThreads), 0, st>>>(a);
    return int(cudaGetLastError());
  });
}

}  // namespace atmoe::cuda
