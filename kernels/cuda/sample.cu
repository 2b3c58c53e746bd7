#include <cuda_runtime.h>

#include "kernels/cuda/sample.cuh"
#include "kernels/cuda/util.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kThreads = 256;

// (value, index) b is better than a: larger value, or the same value at a lower index.
__device__ __forceinline__ void take_better(float& av, int64_t& ai, float bv, int64_t bi) {
  if (bv > av || (bv == av && bi < ai)) av = bv, ai = bi;
}

__global__ void __launch_bounds__(kThreads) argmax_kernel(const float* logits, int64_t ld, int64_t V, int32_t* out) {
  __shared__ float sv[kThreads / 32];
  __shared__ int64_t si[kThreads / 32];
  const float* l = logits + int64_t(blockIdx.x) * ld;
  // A thread's first element is taken unconditionally (so a row of -inf still names an
  // index); later ones only when strictly larger: the lowest index of the thread's maximum.
  float bv = -INFINITY;
  int64_t bi = V;  // past the end: loses every tie against a real element
  if (int64_t(threadIdx.x) < V) bv = l[threadIdx.x], bi = threadIdx.x;
  for (int64_t i = int64_t(threadIdx.x) + blockDim.x; i < V; i += blockDim.x)
    if (l[i] > bv) bv = l[i], bi = i;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, bv, o);
    const int64_t oi = __shfl_xor_sync(kFullMask, bi, o);
    take_better(bv, bi, ov, oi);
  }
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) sv[w] = bv, si[w] = bi;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 1; k < kThreads / 32; ++k) take_better(bv, bi, sv[k], si[k]);
    out[blockIdx.x] = int32_t(bi < V ? bi : 0);
  }
}

}  // namespace

int argmax_rows(const float* logits, int64_t ld, int64_t R, int64_t V, int32_t* out, void* stream) {
  if (R <= 0 || V <= 0) return 0;
  if (R > INT32_MAX) return int(cudaErrorInvalidValue);
  argmax_kernel<<<dim3(unsigned(R)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream)>>>(logits, ld, V, out);
  return int(cudaGetLastError());
}

}  // namespace atmoe::cuda
