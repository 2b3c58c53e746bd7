// CUDA RMSNorm against the CPU specification (float64 reference). Skips without a GPU.
#include <cuda_runtime.h>

#include "kernels/cpu/rmsnorm.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/rmsnorm.cuh"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {

TEST(CudaRmsNorm, MatchesFloat64Reference) {
  std::string why;
  if (cuda::device_count(&why) == 0) GTEST_SKIP() << "no CUDA device: " << why;
  std::mt19937_64 rng(test_seed() + 40);
  for (auto [T, D] : {std::pair<int64_t, int64_t>{1, 1}, {3, 576}, {64, 4096}, {5, 1000}}) {
    auto x = randn(size_t(T * D), rng, 3.f);
    auto w = randn(size_t(D), rng);
    std::vector<float> ref(x.size()), got = poisoned(x.size());
    cpu::rmsnorm_ref({x.data(), D, w.data(), ref.data(), D, T, D, 1e-5f});
    float *dx, *dw, *dy;
    ASSERT_EQ(cudaMalloc(&dx, x.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dw, w.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dy, x.size() * 4), cudaSuccess);
    cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dw, w.data(), w.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dy, got.data(), got.size() * 4, cudaMemcpyHostToDevice);  // poison
    ASSERT_EQ(cuda::rmsnorm({dx, D, dw, dy, D, T, D, 1e-5f}, nullptr), 0);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost);
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dy);
    EXPECT_TRUE(all_close(got.data(), ref.data(), got.size(), kF32)) << "T=" << T << " D=" << D;
  }
}

}  // namespace
}  // namespace atmoe::test
