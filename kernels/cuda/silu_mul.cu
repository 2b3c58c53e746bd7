#include <cuda_runtime.h>

#include "kernels/cuda/silu_mul.cuh"
#include "kernels/cuda/util.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kThreads = 256;

// grid.x covers F in chunks of kThreads; grid.y strides over the rows.
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(ops::SiluMulParams p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.F) return;
  for (int64_t t = blockIdx.y; t < p.T; t += gridDim.y) {
    const float g = p.g[t * p.ldg + i];
    p.out[t * p.ldo + i] = g / (1.f + expf(-g)) * p.u[t * p.ldu + i];
  }
}

}  // namespace

int silu_mul(const ops::SiluMulParams& p, void* stream) {
  if (p.T <= 0 || p.F <= 0) return 0;
  const int64_t bx = (p.F + kThreads - 1) / kThreads;
  if (bx > INT32_MAX) return int(cudaErrorInvalidValue);
  const dim3 grid(unsigned(bx), unsigned(p.T < 65535 ? p.T : 65535));
  silu_mul_kernel<<<grid, dim3(kThreads), 0, static_cast<cudaStream_t>(stream)>>>(p);
  return int(cudaGetLastError());
}

}  // namespace atmoe::cuda
