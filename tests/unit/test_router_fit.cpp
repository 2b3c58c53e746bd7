// Router fitting numerics (coordinator/router_fit.h) against float64 NumPy/SciPy goldens
// (tests/parity/make_fit_goldens.py): the softmax regression of fit-router on planted
// linear separations, k-means (Lloyd from given centres; k-means++ on planted blobs);
// the gradient against finite differences; SHA-256 against the FIPS 180-4 vectors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "common/sha256.h"
#include "coordinator/router_fit.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {

using json = nlohmann::json;

json golden() {
  std::ifstream f(std::string(ATMOE_SOURCE_DIR) + "/tests/parity/goldens/fit_synth.json");
  EXPECT_TRUE(f.good()) << "missing tests/parity/goldens/fit_synth.json (make_fit_goldens.py)";
  return json::parse(f);
}

TEST(RouterFit, SoftmaxRegressionMatchesScipy) {
  const json g = golden();
  for (const auto& c : g["regression"]) {
    const auto X = c["X"].get<std::vector<double>>(), Y = c["Y"].get<std::vector<double>>(),
               w = c["w"].get<std::vector<double>>(), Wr = c["W"].get<std::vector<double>>(),
               br = c["b"].get<std::vector<double>>();
    const int64_t n = c["n"], d = c["d"];
    const int C = c["C"];
    SoftmaxFitOptions o;
    o.l2 = c["l2"];
    o.grad_tol = 1e-10;
    o.max_iter = 20000;
    const SoftmaxFit f = fit_softmax_regression(X.data(), n, d, Y.data(), C, w.data(), o);
    EXPECT_TRUE(f.converged) << "grad " << f.grad_max << " after " << f.iterations;
    EXPECT_NEAR(f.loss, c["loss"].get<double>(), 1e-10 * std::max(1.0, std::fabs(c["loss"].get<double>())));
    // The weights for raw features span scales of 1e-2 .. 1e2: compare each with its own
    // size (the constant column's weight is 0 in both).
    for (size_t i = 0; i < Wr.size(); ++i)
      EXPECT_NEAR(f.W[i], Wr[i], 1e-6 * std::max(std::fabs(Wr[i]), 1e-3)) << "W[" << i << "] n=" << n;
    for (int k = 0; k < C; ++k) EXPECT_NEAR(f.b[size_t(k)], br[size_t(k)], 1e-6 * std::max(1.0, std::fabs(br[size_t(k)])));
    // The planted separation is recovered as well as by the reference.
    int64_t agree = 0, hard = 0;
    for (int64_t i = 0; i < n; ++i) {
      int ya = 0, pa = 0, ra = 0;
      double ymax = -1;
      std::vector<double> p(static_cast<size_t>(C)), r(static_cast<size_t>(C));
      for (int k = 0; k < C; ++k) {
        p[size_t(k)] = f.b[size_t(k)], r[size_t(k)] = br[size_t(k)];
        for (int64_t j = 0; j < d; ++j)
          p[size_t(k)] += f.W[size_t(k * d + j)] * X[size_t(i * d + j)], r[size_t(k)] += Wr[size_t(k * d + j)] * X[size_t(i * d + j)];
        if (Y[size_t(i * C + k)] > ymax) ymax = Y[size_t(i * C + k)], ya = k;
        if (p[size_t(k)] > p[size_t(pa)]) pa = k;
        if (r[size_t(k)] > r[size_t(ra)]) ra = k;
      }
      agree += pa == ra;
      hard += ymax == 1.0;
      (void)ya;
    }
    EXPECT_EQ(agree, n) << "argmax predictions differ from the reference's";
    EXPECT_GT(hard, 0);
  }
}

TEST(RouterFit, GradientMatchesFiniteDifferences) {
  std::mt19937_64 rng(test_seed() + 70);
  std::normal_distribution<double> nd(0, 1);
  const int64_t n = 40, d = 6;
  const int C = 4;
  std::vector<double> Z(static_cast<size_t>(n * d)), Y(static_cast<size_t>(n * C), 0.0), w(static_cast<size_t>(n)), V(static_cast<size_t>(C * d)), c(static_cast<size_t>(C));
  for (auto& x : Z) x = nd(rng);
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int k = 0; k < C; ++k) s += Y[size_t(i * C + k)] = std::fabs(nd(rng));
    for (int k = 0; k < C; ++k) Y[size_t(i * C + k)] /= s;
    w[size_t(i)] = 0.5 + std::fabs(nd(rng));
  }
  for (auto& x : V) x = nd(rng);
  for (auto& x : c) x = nd(rng);
  std::vector<double> g(size_t(C * d + C)), scratch(g.size());
  softmax_objective(Z.data(), n, d, Y.data(), C, w.data(), 0.3, V.data(), c.data(), g.data());
  const double h = 1e-6;
  for (size_t k = 0; k < g.size(); ++k) {
    auto Vp = V, Vm = V;
    auto cp = c, cm = c;
    if (k < V.size()) Vp[k] += h, Vm[k] -= h;
    else cp[k - V.size()] += h, cm[k - V.size()] -= h;
    const double fp = softmax_objective(Z.data(), n, d, Y.data(), C, w.data(), 0.3, Vp.data(), cp.data(), nullptr);
    const double fm = softmax_objective(Z.data(), n, d, Y.data(), C, w.data(), 0.3, Vm.data(), cm.data(), nullptr);
    EXPECT_NEAR(g[k], (fp - fm) / (2 * h), 1e-7) << "component " << k;
  }
}

TEST(RouterFit, DeterministicAndUnchangedByRowOrderScale) {
  // The same data twice gives bit-identical weights; doubling every row weight changes
  // nothing (the loss is a weighted mean), and neither does the order of the rows.
  const json g = golden();
  const auto& c = g["regression"][0];
  const auto X = c["X"].get<std::vector<double>>(), Y = c["Y"].get<std::vector<double>>();
  auto w = c["w"].get<std::vector<double>>();
  SoftmaxFitOptions o;
  o.l2 = c["l2"];
  const SoftmaxFit a = fit_softmax_regression(X.data(), c["n"], c["d"], Y.data(), c["C"], w.data(), o);
  const SoftmaxFit b = fit_softmax_regression(X.data(), c["n"], c["d"], Y.data(), c["C"], w.data(), o);
  EXPECT_EQ(a.W, b.W);
  EXPECT_EQ(a.b, b.b);
  for (auto& x : w) x *= 2;
  const SoftmaxFit d2 = fit_softmax_regression(X.data(), c["n"], c["d"], Y.data(), c["C"], w.data(), o);
  for (size_t i = 0; i < a.W.size(); ++i) EXPECT_NEAR(d2.W[i], a.W[i], 1e-5 * std::max(1e-3, std::fabs(a.W[i])));
  // The rows in another order: the same minimiser (to the solver's tolerance).
  const int64_t n = c["n"], d = c["d"];
  const int C = c["C"];
  std::vector<double> Xp, Yp, wp;
  std::mt19937_64 rng(test_seed() + 71);
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
  for (int64_t i = n - 1; i > 0; --i) std::swap(order[size_t(i)], order[size_t(rng() % uint64_t(i + 1))]);
  for (int64_t i : order) {
    Xp.insert(Xp.end(), X.begin() + i * d, X.begin() + (i + 1) * d);
    Yp.insert(Yp.end(), Y.begin() + i * C, Y.begin() + (i + 1) * C);
    wp.push_back(w[size_t(i)]);
  }
  o.grad_tol = 1e-10;
  const SoftmaxFit p1 = fit_softmax_regression(X.data(), n, d, Y.data(), C, w.data(), o);
  const SoftmaxFit p2 = fit_softmax_regression(Xp.data(), n, d, Yp.data(), C, wp.data(), o);
  for (size_t i = 0; i < p1.W.size(); ++i) EXPECT_NEAR(p2.W[i], p1.W[i], 1e-6 * std::max(1e-3, std::fabs(p1.W[i])));
}

TEST(RouterFit, LloydMatchesNumpyFromTheSameStart) {
  const json g = golden()["lloyd"];
  const auto X = g["X"].get<std::vector<double>>(), start = g["start"].get<std::vector<double>>(),
             cen = g["centroids"].get<std::vector<double>>();
  const auto assign = g["assign"].get<std::vector<int>>();
  const KMeansResult r = kmeans_from(X.data(), g["n"], g["d"], start, g["K"], 300);
  EXPECT_TRUE(r.converged);
  EXPECT_GT(r.iterations, 1) << "the case should take several iterations";
  EXPECT_EQ(r.assign, assign);
  for (size_t i = 0; i < cen.size(); ++i) EXPECT_NEAR(r.centroids[i], cen[i], 1e-12);
  EXPECT_NEAR(r.inertia, g["inertia"].get<double>(), 1e-9 * g["inertia"].get<double>());
}

TEST(RouterFit, KMeansPlusPlusFindsThePlantedBlobs) {
  const json g = golden()["blobs"];
  const auto X = g["X"].get<std::vector<double>>(), cen = g["centroids"].get<std::vector<double>>();
  const auto assign = g["assign"].get<std::vector<int>>();
  const int64_t n = g["n"], d = g["d"];
  const int K = g["K"];
  for (uint64_t seed : {uint64_t(0), uint64_t(1), uint64_t(7), uint64_t(test_seed())}) {
    const KMeansResult r = kmeans(X.data(), n, d, K, seed);
    EXPECT_TRUE(r.converged);
    EXPECT_NEAR(r.inertia, g["inertia"].get<double>(), 1e-9 * g["inertia"].get<double>()) << "seed " << seed;
    // The same partition up to a relabelling, and the same centres under it.
    std::map<int, int> perm;
    for (int64_t i = 0; i < n; ++i) {
      auto [it, fresh] = perm.emplace(r.assign[size_t(i)], assign[size_t(i)]);
      ASSERT_EQ(it->second, assign[size_t(i)]) << "seed " << seed << " point " << i;
    }
    for (const auto& [k, kr] : perm)
      for (int64_t j = 0; j < d; ++j)
        EXPECT_NEAR(r.centroids[size_t(k * d + j)], cen[size_t(kr * d + j)], 1e-9);
    // A fixed point: every point is nearest its own centre, every centre the mean of its points.
    for (int64_t i = 0; i < n; ++i) {
      auto dist = [&](int k) {
        double s = 0;
        for (int64_t j = 0; j < d; ++j) s += std::pow(X[size_t(i * d + j)] - r.centroids[size_t(k * d + j)], 2);
        return s;
      };
      for (int k = 0; k < K; ++k) ASSERT_LE(dist(r.assign[size_t(i)]), dist(k));
    }
  }
  // Deterministic for a seed.
  EXPECT_EQ(kmeans(X.data(), n, d, K, 3).centroids, kmeans(X.data(), n, d, K, 3).centroids);
}

TEST(RouterFit, KMeansDuplicatePoints) {
  // Ten copies of three points: k-means++ finds the three (duplicates have D² = 0), inertia
  // 0; asked for four clusters it still ends (one cluster stays empty, inertia 0).
  std::vector<double> X;
  for (int i = 0; i < 10; ++i) X.insert(X.end(), {1.0, 2.0, -3.0, 4.0, 0.5, 0.5});
  const KMeansResult r = kmeans(X.data(), 30, 2, 3, 5);
  EXPECT_EQ(r.sizes, (std::vector<int64_t>{10, 10, 10}));
  EXPECT_EQ(r.inertia, 0.0);
  const KMeansResult r4 = kmeans(X.data(), 30, 2, 4, 5, 50);
  EXPECT_EQ(r4.inertia, 0.0);
  for (double v : r4.centroids) EXPECT_TRUE(std::isfinite(v));
  EXPECT_EQ(std::count(r4.sizes.begin(), r4.sizes.end(), int64_t(0)), 1);
}

TEST(Sha256, FipsVectors) {
  EXPECT_EQ(sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";  // 56 bytes: padding spills
  EXPECT_EQ(sha256_hex(two.data(), two.size()), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  const std::string mil(1000000, 'a');
  EXPECT_EQ(sha256_hex(mil.data(), mil.size()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

}  // namespace
}  // namespace atmoe::test
