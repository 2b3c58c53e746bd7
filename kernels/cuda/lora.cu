#include <cuda_runtime.h>

#include "kernels/cuda/lora.cuh"
#include "kernels/cuda/util.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kShrinkWarps = 4;
constexpr int kExpandThreads = 256;

// Block = one shrink item; warp w takes rank rows r0 + w, r0 + w + kShrinkWarps, ...
template <class W>
__global__ void __launch_bounds__(kShrinkWarps * 32) lora_shrink_kernel(LoraMixDev a) {
  const LoraShrinkItem it = a.shrink[blockIdx.x];
  const LoraSiteDev s = a.sites[it.site];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const float* x = a.x + int64_t(it.tok) * a.ldx;
  for (int64_t r = int64_t(it.r0) + w; r < it.r1; r += kShrinkWarps) {
    const W* A = static_cast<const W*>(it.A) + (r - it.r0) * a.d_in;
    float d = 0.f;
    if (a.vec) {
      for (int64_t c = lane; c < a.d_in / 8; c += 32) {
        float wv[8];
        load_w8(A + c * 8, wv);
        const float4* xp = reinterpret_cast<const float4*>(x + c * 8);
        const float4 x0 = xp[0], x1 = xp[1];
        d += wv[0] * x0.x + wv[1] * x0.y + wv[2] * x0.z + wv[3] * x0.w + wv[4] * x1.x + wv[5] * x1.y + wv[6] * x1.z +
             wv[7] * x1.w;
      }
    } else {
      for (int64_t k = lane; k < a.d_in; k += 32) d += load_w(A, k) * x[k];
    }
    d = warp_sum(d);
    if (lane == 0) {
      const int32_t col = s.row_col[r];
      const float coef = col < 0 ? 0.f : a.coef[int64_t(it.tok) * a.ldc + col] * s.row_scale[r];
      a.u[int64_t(it.tok) * a.ldu + s.u_off + r] = d * coef;
    }
  }
}

// Block (blockIdx.x = expand item, blockIdx.y = chunk of kExpandThreads outputs).
template <class W>
__global__ void __launch_bounds__(kExpandThreads) lora_expand_kernel(LoraMixDev a) {
  const LoraExpandItem it = a.expand[blockIdx.x];
  const LoraSiteDev s = a.sites[it.site];
  const int64_t n = int64_t(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (n >= s.d_out) return;
  const float* u = a.u + int64_t(it.tok) * a.ldu + s.u_off;
  float acc = 0.f;
  for (int32_t q = 0; q < it.n_ranges; ++q) {
    const LoraRangeDev rg = a.ranges[it.range0 + q];
    const W* Bt = static_cast<const W*>(rg.Bt);
    for (int64_t r = rg.r0; r < rg.r1; ++r) acc += load_w(Bt, (r - rg.r0) * s.d_out + n) * u[r];
  }
  float* y = s.y + int64_t(it.tok) * s.ldy + n;
  *y += acc;
}

}  // namespace

int lora_mix(const LoraMixDev& a, void* stream) {
  if (a.n_shrink <= 0) return 0;
  if (a.n_shrink > INT32_MAX || a.n_expand > INT32_MAX) return int(cudaErrorInvalidValue);
  const int64_t chunks = (a.max_d_out + kExpandThreads - 1) / kExpandThreads;
  if (chunks > 65535) return int(cudaErrorInvalidValue);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch_wtype(a.dtype, [&](auto wtag) {
    using W = decltype(wtag);
    lora_shrink_kernel<W><<<dim3(unsigned(a.n_shrink)), dim3(kShrinkWarps * 32), 0, st>>>(a);
    int e = int(cudaGetLastError());
    if (e != 0 || a.n_expand <= 0 || chunks <= 0) return e;
    lora_expand_kernel<W><<<dim3(unsigned(a.n_expand), unsigned(chunks)), dim3(kExpandThreads), 0, st>>>(a);
    return int(cudaGetLastError());
  });
}

}  // namespace atmoe::cuda
