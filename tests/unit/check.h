// Comparison helpers: |a - b| <= atol + rtol * |ref| element-wise (CONVENTIONS.md table),
// NaN/Inf checked separately, and random fills.
#pragma once
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace atmoe::test {

struct Tol {
  double atol, rtol;
};
constexpr Tol kF32{1e-5, 1e-5};
constexpr Tol kF16{5e-3, 5e-3};
constexpr Tol kBF16{2e-2, 3e-2};
// Sums of many products in another order than the float64 reference (GEMMs, LoRA, T-REX,
// attention): the absolute part grows with the terms' count, sqrt(K) |x||w| for unit-scale
// inputs. bf16: weights rounded to bf16 on both sides, activations possibly rounded too
// (kernels/ops.h MatmulParams).
inline Tol kSumF32(int64_t K) { return {4e-5 * std::sqrt(double(K)), 1e-5}; }
inline Tol kSumBF16(int64_t K) { return {1e-2 * std::sqrt(double(K)), 1e-2}; }

inline ::testing::AssertionResult all_close(const float* got, const float* ref, size_t n, Tol t) {
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(got[i])) return ::testing::AssertionFailure() << "non-finite output at " << i << ": " << got[i];
    double d = std::fabs(double(got[i]) - double(ref[i]));
    if (d > t.atol + t.rtol * std::fabs(double(ref[i])))
      return ::testing::AssertionFailure() << "mismatch at " << i << ": got " << got[i] << " ref " << ref[i];
  }
  return ::testing::AssertionSuccess();
}

inline std::vector<float> randn(size_t n, std::mt19937_64& rng, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline std::vector<float> poisoned(size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

// A backend or GPU that cannot run here: skipped, unless ATMOE_REQUIRE_GPU=1 (a GPU
// machine's test run), where a skip would hide a broken driver: then the test fails.
#define ATMOE_SKIP_OR_FAIL(why)                                                       \
  do {                                                                               \
    const char* req_ = std::getenv("ATMOE_REQUIRE_GPU");                             \
    if (req_ && std::string(req_) == "1") FAIL() << "ATMOE_REQUIRE_GPU=1 but " << why; \
    GTEST_SKIP() << why;                                                             \
  } while (0)

// A fresh seed per run (printed so a failure can be replayed with ATMOE_TEST_SEED).
inline uint64_t test_seed() {
  static uint64_t s = [] {
    const char* e = std::getenv("ATMOE_TEST_SEED");
    uint64_t v = e ? std::stoull(e) : std::random_device{}();
    std::printf("ATMOE_TEST_SEED=%llu\n", (unsigned long long)v);
    return v;
  }();
  return s;
}

}  // namespace atmoe::test
