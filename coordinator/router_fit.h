// Fitting routers (DESIGN.md 1.4): the float64 numerics of `atmoe fit-router` (softmax
// regression per layer) and `atmoe fit-intuition` (k-means++ centroids). No model here:
// the commands (apps/cmd_fit.cpp) gather the features and call these.
#pragma once
#include <cstdint>
#include <vector>

namespace atmoe {

// Multinomial logistic regression with soft targets, fitted by L-BFGS:
//   minimise  (1 / Σ_i w_i) Σ_i w_i Σ_c −Y_ic · log softmax(V z_i + c)_c  +  (l2 / 2) ‖V‖²
// with z_i = (x_i − μ) / σ the features standardised on the (weighted) fitting rows
// (columns of zero variance get σ = 1) and no penalty on the bias c. The result applies to
// raw features: W = V / σ (column-wise), b = c − W μ. The objective is strictly convex
// (l2 > 0), so its minimiser is unique and the fit deterministic.
struct SoftmaxFitOptions {
  double l2 = 1e-3;
  int max_iter = 1000;
  double grad_tol = 1e-7;  // stop when max |∂f| (over V and c) is below this
};

struct SoftmaxFit {
  std::vector<double> W;  // [C, d], applies to raw x
  std::vector<double> b;  // [C]
  double loss = 0;        // the objective at the end (standardised weights)
  double grad_max = 0;    // max |∂f| at the end
  int iterations = 0;
  bool converged = false;
};

// X: [n, d] row-major; Y: [n, C], each row a distribution (non-negative, sums to 1);
// row_w: [n] non-negative weights (nullptr: all 1). C >= 2, n >= 1.
SoftmaxFit fit_softmax_regression(const double* X, int64_t n, int64_t d, const double* Y, int C,
                                  const double* row_w, const SoftmaxFitOptions& o);

// The objective above and its gradient at (V, c) on standardised features Z (exposed for
// tests: a finite-difference check). grad: [C * d + C], V's then c's.
double softmax_objective(const double* Z, int64_t n, int64_t d, const double* Y, int C, const double* row_w,
                         double l2, const double* V, const double* c, double* grad);

// k-means on the rows of X ([n, d]): greedy k-means++ seeding from `seed` (the first
// centre uniform, each next the best of 2 + ln K candidates drawn by D² sampling), then
// Lloyd's iterations until no assignment changes or max_iter; `restarts` runs, the lowest
// inertia kept. A cluster left empty takes the point farthest from its centre (with fewer
// distinct points than K some cluster stays empty). Deterministic for a seed.
struct KMeansResult {
  std::vector<double> centroids;  // [K, d]
  std::vector<int> assign;        // [n]
  std::vector<int64_t> sizes;     // [K]
  double inertia = 0;             // Σ_i ‖x_i − centroid(assign_i)‖²
  int iterations = 0;
  bool converged = false;
};
KMeansResult kmeans(const double* X, int64_t n, int64_t d, int K, uint64_t seed, int max_iter = 300, int restarts = 4);
// Lloyd's iterations from given centres (tests compare them with a reference from the same start).
KMeansResult kmeans_from(const double* X, int64_t n, int64_t d, std::vector<double> centroids, int K, int max_iter);

}  // namespace atmoe
