#include <cuda_runtime.h>

#include "kernels/cuda/rmsnorm.cuh"
#include "kernels/cuda/util.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kThreads = 256;

// Each thread reads and writes the same elements, after the reduction: y may alias x.
__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(ops::RmsNormParams p) {
  __shared__ float sh[32];
  const int64_t t = blockIdx.x;
  const float* x = p.x + t * p.ldx;
  float* y = p.y + t * p.ldy;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < p.D; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum(ss, sh);
  const float scale = 1.f / sqrtf(ss / float(p.D) + p.eps);
  for (int64_t i = threadIdx.x; i < p.D; i += blockDim.x) y[i] = x[i] * scale * p.w[i];
}

}  // namespace

int rmsnorm(const ops::RmsNormParams& p, void* stream) {
  if (p.T <= 0 || p.D <= 0) return 0;
  if (p.T > INT32_MAX) return int(cudaErrorInvalidValue);
  rmsnorm_kernel<<<dim3(unsigned(p.T)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream)>>>(p);
  return int(cudaGetLastError());
}

}  // namespace atmoe::cuda
