#include <cuda_runtime.h>

#include "kernels/cuda/softmax.cuh"
#include "kernels/cuda/util.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) softmax_kernel(ops::SoftmaxParams p) {
  __shared__ float sh[32];
  float* v = p.x + int64_t(blockIdx.x) * p.ld;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < p.C; i += blockDim.x) m = fmaxf(m, v[i] * p.scale);
  m = block_max(m, sh);
  if (!isfinite(m)) {  // the same m in every thread: the whole block leaves here
    for (int64_t i = threadIdx.x; i < p.C; i += blockDim.x) v[i] = 0.f;
    return;
  }
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < p.C; i += blockDim.x) s += expf(v[i] * p.scale - m);
  s = block_sum(s, sh);  // its barriers order every read above before the writes below
  const float inv = 1.f / s;
  for (int64_t i = threadIdx.x; i < p.C; i += blockDim.x) v[i] = expf(v[i] * p.scale - m) * inv;
}

}  // namespace

int softmax_rows(const ops::SoftmaxParams& p, void* stream) {
  if (p.R <= 0 || p.C <= 0) return 0;
  if (p.R > INT32_MAX) return int(cudaErrorInvalidValue);
  softmax_kernel<<<dim3(unsigned(p.R)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream)>>>(p);
  return int(cudaGetLastError());
}

}  // namespace atmoe::cuda
