// Comparison helpers: |a - b| <= atol + rtol * |ref| element-wise (CONVENTIONS.md table),
// NaN/Inf checked separately, and random fills.
#pragma once
#include <cmath>
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
