// What is particular to the CPU kernels: the packed panel layout and the matmul on every
// ISA this CPU has (through the dispatcher, which ctest also runs on the OpenBLAS path, and
// each kernel directly), and the host sampler (random draws, penalties, log-probabilities).
// Every op behind the Backend interface, on every backend, is in test_backend_ops.cpp.
#include <algorithm>
#include <cmath>
#include <map>

#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/sampling.h"
#include "kernels/thread_pool.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {

ThreadPool& pool2() {
  static ThreadPool p(2);
  return p;
}

struct MatmulCase {
  int64_t T, N, K;
};
const MatmulCase kMatmulCases[] = {{1, 1, 1},     {1, 37, 576}, {3, 130, 77},  {4, 64, 1536},  {16, 67, 100},
                                   {7, 17, 15},   {13, 48, 33}, {31, 96, 64},  {33, 300, 576}, {64, 259, 100},
                                   {40, 1100, 8}, {37, 40, 50}, {38, 33, 257}, {35, 64, 96}};

using Kernel = void (*)(const cpu::MatmulParams&, int64_t, int64_t);

void run_matmul_case(const MatmulCase& c, DType wdt, bool bias, bool acc, Kernel direct, std::mt19937_64& rng) {
  auto x = randn(size_t(c.T * c.K), rng);
  auto wf = randn(size_t(c.N * c.K), rng, 0.5f);
  // Packed panels; the reference reads them back through packed_at, and an
  // independent check below compares packed_at with the row-major source.
  std::vector<float> pf(cpu::packed_elems(c.N, c.K));
  std::vector<uint16_t> pb(pf.size());
  cpu::pack_weights(wf.data(), c.N, c.K, DType::F32, pf.data());
  cpu::pack_weights(wf.data(), c.N, c.K, DType::BF16, pb.data());
  for (int64_t n = 0; n < c.N; n += 7)
    for (int64_t k = 0; k < c.K; k += 5) {
      ASSERT_EQ(cpu::packed_at(pf.data(), DType::F32, c.K, n, k), wf[size_t(n * c.K + k)]);
      ASSERT_EQ(cpu::packed_at(pb.data(), DType::BF16, c.K, n, k), bf16_to_f32(f32_to_bf16(wf[size_t(n * c.K + k)])));
    }
  auto b = randn(size_t(c.N), rng);
  auto y0 = randn(size_t(c.T * c.N), rng);  // prior contents for accumulate
  cpu::MatmulParams p;
  p.x = x.data();
  p.ldx = c.K;
  p.w = wdt == DType::F32 ? static_cast<const void*>(pf.data()) : pb.data();
  p.w_dtype = wdt;
  p.bias = bias ? b.data() : nullptr;
  p.ldy = c.N;
  p.T = c.T;
  p.N = c.N;
  p.K = c.K;
  p.accumulate = acc;
  std::vector<float> ref = y0;
  p.y = ref.data();
  cpu::matmul_ref(p);
  std::vector<float> got = acc ? y0 : poisoned(y0.size());
  p.y = got.data();
  if (direct) {
    direct(p, 0, (c.N + cpu::kPanel - 1) / cpu::kPanel);
  } else {
    std::vector<float> ws(static_cast<size_t>(cpu::matmul_workspace_floats(p)) + 1);
    cpu::matmul(p, ws.data(), pool2());
  }
  // sgemm and the SIMD kernels sum in a different order than the double reference:
  // the tolerance scales with the magnitude of the terms (sqrt(K) * |x||w|).
  Tol t{1e-5 * std::sqrt(double(c.K)) * 4, 1e-5};
  EXPECT_TRUE(all_close(got.data(), ref.data(), got.size(), t))
      << "T=" << c.T << " N=" << c.N << " K=" << c.K << " w=" << dtype_name(wdt) << " bias=" << bias << " acc=" << acc;
}

TEST(Matmul, DispatcherMatchesReference) {
  // ctest also runs this with ATMOE_PREFILL_GEMM=blas (tests/CMakeLists.txt: the OpenBLAS path).
  std::mt19937_64 rng(test_seed());
  for (const auto& c : kMatmulCases)
    for (DType dt : {DType::F32, DType::BF16})
      for (bool bias : {false, true})
        for (bool acc : {false, true}) run_matmul_case(c, dt, bias, acc, nullptr, rng);
}

TEST(Matmul, EveryIsaKernelMatchesReference) {
  std::mt19937_64 rng(test_seed() + 1);
  std::map<std::string, Kernel> ks{{"scalar", cpu::gemm_panels_scalar}};
  if (cpu::best_isa() >= cpu::Isa::Avx2) ks["avx2"] = cpu::gemm_panels_avx2;
  if (cpu::best_isa() >= cpu::Isa::Avx512) ks["avx512"] = cpu::gemm_panels_avx512;
  for (auto& [name, k] : ks) {
    SCOPED_TRACE(name);
    for (const auto& c : kMatmulCases)
      for (DType dt : {DType::F32, DType::BF16})
        for (bool acc : {false, true}) run_matmul_case(c, dt, true, acc, k, rng);
  }
}

TEST(Sampling, GreedyTopKTopPAndDistribution) {
  std::mt19937_64 rng(test_seed() + 7);
  std::vector<std::pair<float, int32_t>> scratch;
  std::vector<float> lg{0.1f, 2.0f, -1.f, 2.0f, 1.5f};
  EXPECT_EQ(cpu::argmax(lg.data(), 5), 1);  // lowest id on ties
  EXPECT_EQ(cpu::sample(lg.data(), 5, {0.f, 0, 1.f}, rng, scratch), 1);
  EXPECT_EQ(cpu::sample(lg.data(), 5, {1.f, 1, 1.f}, rng, scratch), 1);
  // top_k = 2 -> only ids 1 and 3 (the two 2.0 logits) can appear.
  for (int i = 0; i < 200; ++i) {
    int32_t t = cpu::sample(lg.data(), 5, {1.f, 2, 1.f}, rng, scratch);
    EXPECT_TRUE(t == 1 || t == 3);
  }
  // Empirical frequencies follow softmax(logits / T).
  const float T = 0.7f;
  std::vector<double> p(5);
  double z = 0;
  for (int i = 0; i < 5; ++i) z += (p[size_t(i)] = std::exp(double(lg[size_t(i)]) / T));
  for (auto& v : p) v /= z;
  std::vector<int> cnt(5);
  const int n = 40000;
  for (int i = 0; i < n; ++i) cnt[size_t(cpu::sample(lg.data(), 5, {T, 0, 1.f}, rng, scratch))]++;
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(cnt[size_t(i)] / double(n), p[size_t(i)], 5 * std::sqrt(p[size_t(i)] / n) + 1e-3);
  // top_p = 0.5: the smallest prefix reaching half the mass: ids {1, 3} here.
  for (int i = 0; i < 200; ++i) {
    int32_t t = cpu::sample(lg.data(), 5, {1.f, 0, 0.5f}, rng, scratch);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
}

// min_p keeps tokens with p >= min_p * p_max (after temperature), then the draw follows the
// renormalised softmax over them.
TEST(Sampling, MinPAgainstFloat64) {
  std::mt19937_64 rng(test_seed() + 11);
  std::vector<std::pair<float, int32_t>> scratch;
  std::vector<float> lg{0.0f, 1.0f, 2.0f, 2.2f, -3.f, 1.9f};
  const float T = 0.8f, min_p = 0.5f;
  std::vector<double> p(lg.size());
  double pmax = 0, z = 0;
  for (size_t i = 0; i < lg.size(); ++i) pmax = std::max(pmax, p[i] = std::exp(double(lg[i]) / T));
  for (size_t i = 0; i < lg.size(); ++i) {
    if (p[i] < min_p * pmax) p[i] = 0;
    z += p[i];
  }
  for (auto& v : p) v /= z;
  ASSERT_EQ(p[0], 0.0);
  ASSERT_GT(p[5], 0.0);
  std::vector<int> cnt(lg.size());
  const int n = 40000;
  cpu::SamplingParams sp{T, 0, 1.f, min_p};
  for (int i = 0; i < n; ++i) cnt[size_t(cpu::sample(lg.data(), int64_t(lg.size()), sp, rng, scratch))]++;
  for (size_t i = 0; i < lg.size(); ++i)
    EXPECT_NEAR(cnt[i] / double(n), p[i], 5 * std::sqrt(p[i] / n) + 1e-3) << i;
  // With top_k 2 after min_p: ids 3 and 2 only.
  sp.top_k = 2;
  for (int i = 0; i < 300; ++i) {
    const int32_t t = cpu::sample(lg.data(), int64_t(lg.size()), sp, rng, scratch);
    EXPECT_TRUE(t == 2 || t == 3) << t;
  }
}

// OpenAI's presence/frequency penalties on output tokens, the HF repetition penalty on
// prompt and output tokens, against the formulas in float64 on fresh random logits.
TEST(Sampling, PenaltiesMatchTheirDefinitions) {
  std::mt19937_64 rng(test_seed() + 12);
  std::normal_distribution<float> nd(0.f, 3.f);
  const int64_t V = 257;
  std::vector<float> lg(static_cast<size_t>(V));
  for (auto& x : lg) x = nd(rng);
  std::vector<int32_t> counts(static_cast<size_t>(V), 0);
  std::vector<uint8_t> in_prompt(size_t(V), 0);
  for (int i = 0; i < 60; ++i) counts[size_t(rng() % uint64_t(V))] += 1 + int(rng() % 3);
  for (int i = 0; i < 40; ++i) in_prompt[size_t(rng() % uint64_t(V))] = 1;
  const cpu::LogitPenalties pen{0.4f, 0.3f, 1.3f};
  std::vector<float> got = lg;
  cpu::apply_penalties(got.data(), V, pen, counts.data(), in_prompt.data());
  int changed = 0;
  for (int64_t t = 0; t < V; ++t) {
    double x = lg[size_t(t)];
    const int c = counts[size_t(t)];
    if (c > 0 || in_prompt[size_t(t)]) x = x > 0 ? x / 1.3 : x * 1.3;
    if (c > 0) x -= 0.3 * c + 0.4;
    EXPECT_NEAR(got[size_t(t)], x, 1e-5 * (1 + std::abs(x))) << t;
    changed += got[size_t(t)] != lg[size_t(t)];
  }
  EXPECT_GT(changed, 50);
  // No penalty: the logits stay bit for bit.
  std::vector<float> same = lg;
  cpu::apply_penalties(same.data(), V, cpu::LogitPenalties{}, counts.data(), in_prompt.data());
  EXPECT_EQ(same, lg);
}

// Log-probabilities: log softmax of the raw logits (float64 reference), top-n descending.
TEST(Sampling, LogprobsAgainstFloat64) {
  std::mt19937_64 rng(test_seed() + 13);
  std::normal_distribution<float> nd(0.f, 4.f);
  const int64_t V = 1000;
  std::vector<float> lg(static_cast<size_t>(V));
  for (auto& x : lg) x = nd(rng) + 20.f;  // a large offset: the max subtraction matters
  double m = -1e300, z = 0;
  for (float x : lg) m = std::max(m, double(x));
  for (float x : lg) z += std::exp(double(x) - m);
  const double lse = m + std::log(z);
  std::vector<std::pair<float, int32_t>> scratch;
  cpu::TokenLogprob out;
  const int32_t tok = int32_t(rng() % uint64_t(V));
  cpu::logprobs(lg.data(), V, tok, 5, out, scratch);
  EXPECT_EQ(out.token, tok);
  EXPECT_NEAR(out.logprob, double(lg[size_t(tok)]) - lse, 1e-4);
  ASSERT_EQ(out.top.size(), 5u);
  std::vector<int32_t> order(static_cast<size_t>(V));
  for (int32_t i = 0; i < V; ++i) order[size_t(i)] = i;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return lg[size_t(a)] > lg[size_t(b)]; });
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(out.top[i].first, order[i]);
    EXPECT_NEAR(out.top[i].second, double(lg[size_t(order[i])]) - lse, 1e-4);
  }
  cpu::logprobs(lg.data(), V, tok, 0, out, scratch);
  EXPECT_TRUE(out.top.empty());
}

}  // namespace
}  // namespace atmoe::test
