#include <cuda_runtime.h>

#include "kernels/cuda/rope.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads) rope_kernel(ops::RopeParams p) {
  extern __shared__ float cs[];  // [half] cos, then [half] sin
  const int64_t t = blockIdx.x, half = p.D / 2;
  const double pos = double(p.pos[t]);
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    double s, c;
    sincos(pos * double(p.inv_freq[i]), &s, &c);
    cs[i] = float(c);
    cs[half + i] = float(s);
  }
  __syncthreads();
  float* row = p.x + t * p.ldx;
  for (int64_t e = threadIdx.x; e < p.H * half; e += blockDim.x) {
    const int64_t h = e / half, i = e % half;
    float* v = row + h * p.D;
    const int64_t a = p.neox ? i : 2 * i, b = p.neox ? i + half : 2 * i + 1;
    const float c = cs[i], s = cs[half + i];
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x0 * s + x1 * c;
  }
}

}  // namespace

int rope(const ops::RopeParams& p, void* stream) {
  if (p.T <= 0 || p.H <= 0 || p.D < 2) return 0;
  if (p.D > kRopeMaxD || p.T > INT32_MAX) return int(cudaErrorInvalidValue);
  const size_t shmem = size_t(p.D / 2) * 2 * sizeof(float);
  rope_kernel<<<dim3(unsigned(p.T)), dim3(kThreads), shmem, static_cast<cudaStream_t>(stream)>>>(p);
  return int(cudaGetLastError());
}

}  // namespace atmoe::cuda
