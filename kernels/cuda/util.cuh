// Device helpers shared by the kernels of kernels/cuda/ (included by .cu files only; host
// callers include the op's own .cuh, which has no CUDA header).
//   - warp / block reductions (f32; every thread gets the result);
//   - weight element loads for the two prepared dtypes: f32, and bf16 stored as the upper
//     16 bits of an f32 (common/dtype.h), read as uint16_t;
//   - the one dtype dispatch helper (CONVENTIONS.md 4): DType -> the C++ element type.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace atmoe::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide reductions for blockDim.x a multiple of 32 (<= 1024), called by every thread
// of the block; `sh` is __shared__ scratch of at least 32 floats. The leading barrier lets
// two reductions run back to back on the same scratch.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  return warp_sum(lane < nw ? sh[lane] : 0.f);
}

__device__ __forceinline__ float block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  return warp_max(lane < nw ? sh[lane] : -INFINITY);
}

// bf16 bits (low 16 bits of h) -> f32.
__device__ __forceinline__ float bf16_bits_to_f32(uint32_t h) {
  return __uint_as_float(h << 16);
}

// f32 -> bf16 bits, round to nearest even, quiet NaN: the same as common/dtype.h f32_to_bf16.
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Element i of a prepared weight array.
__device__ __forceinline__ float load_w(const float* w, int64_t i) {
  return w[i];
}
__device__ __forceinline__ float load_w(const uint16_t* w, int64_t i) {
  return bf16_bits_to_f32(w[i]);
}

// Eight consecutive elements starting at w, which is 16-byte aligned (f32: two 16-byte
// loads; bf16: one).
__device__ __forceinline__ void load_w8(const float* w, float* out) {
  const float4 a = reinterpret_cast<const float4*>(w)[0], b = reinterpret_cast<const float4*>(w)[1];
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
__device__ __forceinline__ void load_w8(const uint16_t* w, float* out) {
  const uint4 a = reinterpret_cast<const uint4*>(w)[0];  // little endian: element 2i in the low half
  const uint32_t u[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(u[i] << 16);
    out[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

// The dtype dispatch (host side): calls f(W{}) with W = float for F32, uint16_t for BF16;
// returns cudaErrorInvalidValue for any other dtype, else what f returns.
template <class F>
inline int dispatch_wtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32:
      return f(float{});
    case DType::BF16:
      return f(uint16_t{});
    default:
      return int(cudaErrorInvalidValue);
  }
}

// Grid size for a grid-stride loop over n elements with `threads` per block.
inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 65535) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return unsigned(b);
}

}  // namespace atmoe::cuda
