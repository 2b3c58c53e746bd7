#include <cuda_runtime.h>

#include "kernels/cuda/matmul.cuh"
#include "kernels/cuda/util.cuh"

namespace atmoe::cuda {
namespace {

constexpr int kGemvWarps = 4;  // output rows per block
constexpr int kThreads = 256;

struct GemvArgs {
  const float* x;
  int64_t ldx;
  const void* w;
  const float* bias;
  float* y;
  int64_t ldy;
  int64_t N, K;
  bool accumulate;
  bool vec;  // K % 8 == 0, ldx % 4 == 0, x and w 16-byte aligned
};

// Warp (blockIdx.x * kGemvWarps + warp) computes output row n for the T tokens.
template <class W, int T>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(GemvArgs a) {
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (n >= a.N) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const W* w = static_cast<const W*>(a.w) + n * a.K;
  float acc[T];
#pragma unroll
  for (int t = 0; t < T; ++t) acc[t] = 0.f;
  if (a.vec) {
    const int64_t K8 = a.K / 8;
    for (int64_t c = lane; c < K8; c += 32) {
      float wv[8];
      load_w8(w + c * 8, wv);
#pragma unroll
      for (int t = 0; t < T; ++t) {
        const float4* xp = reinterpret_cast<const float4*>(a.x + t * a.ldx + c * 8);
        const float4 x0 = xp[0], x1 = xp[1];
        acc[t] += wv[0] * x0.x + wv[1] * x0.y + wv[2] * x0.z + wv[3] * x0.w + wv[4] * x1.x + wv[5] * x1.y +
                  wv[6] * x1.z + wv[7] * x1.w;
      }
    }
  } else {
    for (int64_t k = lane; k < a.K; k += 32) {
      const float wk = load_w(w, k);
#pragma unroll
      for (int t = 0; t < T; ++t) acc[t] += wk * a.x[t * a.ldx + k];
    }
  }
#pragma unroll
  for (int t = 0; t < T; ++t) {
    float s = warp_sum(acc[t]);
    if (lane == 0) {
      if (a.bias) s += a.bias[n];
      float* y = a.y + t * a.ldy + n;
      *y = a.accumulate ? *y + s : s;
    }
  }
}

template <class W, int T>
int launch_gemv(const GemvArgs& a, cudaStream_t st) {
  const int64_t blocks = (a.N + kGemvWarps - 1) / kGemvWarps;
  if (blocks > INT32_MAX) return int(cudaErrorInvalidValue);
  gemv_kernel<W, T><<<dim3(unsigned(blocks)), dim3(kGemvWarps * 32), 0, st>>>(a);
  return int(cudaGetLastError());
}

// The token-count dispatch (1..kGemvMaxTokens -> template parameter).
template <class W>
int gemv_for_tokens(int64_t T, const GemvArgs& a, cudaStream_t st) {
  switch (T) {
    case 1:
      return launch_gemv<W, 1>(a, st);
    case 2:
      return launch_gemv<W, 2>(a, st);
    case 3:
      return launch_gemv<W, 3>(a, st);
    case 4:
      return launch_gemv<W, 4>(a, st);
    case 5:
      return launch_gemv<W, 5>(a, st);
    case 6:
      return launch_gemv<W, 6>(a, st);
    case 7:
      return launch_gemv<W, 7>(a, st);
    case 8:
      return launch_gemv<W, 8>(a, st);
    default:
      return int(cudaErrorInvalidValue);
  }
}
static_assert(kGemvMaxTokens == 8, "gemv_for_tokens covers 1..8");

__global__ void __launch_bounds__(kThreads)
    to_bf16_kernel(const float* x, int64_t ldx, int64_t T, int64_t K, uint16_t* out) {
  const int64_t n = T * K;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / K, k = e % K;
    out[e] = f32_to_bf16_bits(x[t * ldx + k]);
  }
}

__global__ void __launch_bounds__(kThreads)
    bias_kernel(const float* bias, float* y, int64_t ldy, int64_t T, int64_t N, bool accumulate) {
  const int64_t n_all = T * N;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n_all; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / N, n = e % N;
    float* yp = y + t * ldy + n;
    const float b = bias ? bias[n] : 0.f;
    *yp = accumulate ? *yp + b : b;
  }
}

bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace

int matmul_gemv(const ops::MatmulParams& p, void* stream) {
  if (p.T <= 0 || p.N <= 0) return 0;
  if (p.T > kGemvMaxTokens || p.K < 0) return int(cudaErrorInvalidValue);
  GemvArgs a{p.x, p.ldx, p.w, p.bias, p.y, p.ldy, p.N, p.K, p.accumulate, false};
  a.vec = p.K % 8 == 0 && p.ldx % 4 == 0 && aligned16(p.x) && aligned16(p.w);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch_wtype(p.w_dtype, [&](auto wtag) { return gemv_for_tokens<decltype(wtag)>(p.T, a, st); });
}

int f32_to_bf16_rows(const float* x, int64_t ldx, int64_t T, int64_t K, void* out, void* stream) {
  if (T <= 0 || K <= 0) return 0;
  to_bf16_kernel<<<grid_for(T * K, kThreads), dim3(kThreads), 0, static_cast<cudaStream_t>(stream)>>>(
      x, ldx, T, K, static_cast<uint16_t*>(out));
  return int(cudaGetLastError());
}

int add_bias_rows(const float* bias, float* y, int64_t ldy, int64_t T, int64_t N, bool accumulate, void* stream) {
  if (T <= 0 || N <= 0 || (accumulate && !bias)) return 0;
  bias_kernel<<<grid_for(T * N, kThreads), dim3(kThreads), 0, static_cast<cudaStream_t>(stream)>>>(bias, y, ldy, T, N,
                                                                                                   accumulate);
  return int(cudaGetLastError());
}

}  // namespace atmoe::cuda
