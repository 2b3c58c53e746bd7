#include <cuda_runtime.h>

#include "kernels/cuda/rmsnorm.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void rmsnorm_kernel(RmsNormParams p) {
  const int64_t t = blockIdx.x;
  const float* x = p.x + t * p.ldx;
  float* y = p.y + t * p.ldy;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < p.D; i += blockDim.x) ss += x[i] * x[i];
  // Warp reduction, then across warps through shared memory.
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  __shared__ float part[kThreads / 32];
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) part[0] = v;
  }
  __syncthreads();
  const float scale = rsqrtf(part[0] / float(p.D) + p.eps);
  for (int64_t i = threadIdx.x; i < p.D; i += blockDim.x) y[i] = x[i] * scale * p.w[i];
}

}  // namespace

int rmsnorm(const RmsNormParams& p, void* stream) {
  if (p.T == 0) return 0;
  rmsnorm_kernel<<<dim3(unsigned(p.T)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream)>>>(p);
  return int(cudaGetLastError());
}

}  // namespace atmoe::cuda
