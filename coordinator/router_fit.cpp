#include "coordinator/router_fit.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <random>

#include <cblas.h>

#include "common/error.h"

namespace atmoe {

double softmax_objective(const double* Z, int64_t n, int64_t d, const double* Y, int C, const double* row_w,
                         double l2, const double* V, const double* c, double* grad) {
  std::vector<double> L(size_t(n) * size_t(C));
  // L = Z V^T + c
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), C, int(d), 1.0, Z, int(d), V, int(d), 0.0, L.data(), C);
  double wsum = 0;
  for (int64_t i = 0; i < n; ++i) wsum += row_w ? row_w[i] : 1.0;
  ATMOE_ASSERT(wsum > 0);
  double loss = 0;
  for (int64_t i = 0; i < n; ++i) {
    double* l = &L[size_t(i * C)];
    const double* y = Y + i * C;
    double m = -INFINITY, ys = 0;
    for (int k = 0; k < C; ++k) m = std::max(m, l[k] += c[k]);
    double z = 0;
    for (int k = 0; k < C; ++k) z += std::exp(l[k] - m);
    const double lse = m + std::log(z), wi = (row_w ? row_w[i] : 1.0) / wsum;
    double li = 0;
    for (int k = 0; k < C; ++k) li += y[k] * (lse - l[k]), ys += y[k];
    loss += wi * li;
    // ∂/∂logit_k of Σ_k' y_k' (lse − l_k') = ys · p_k − y_k; L becomes the row's residual.
    for (int k = 0; k < C; ++k) l[k] = wi * (ys * std::exp(l[k] - lse) - y[k]);
  }
  double reg = 0;
  for (int64_t j = 0; j < int64_t(C) * d; ++j) reg += V[j] * V[j];
  loss += 0.5 * l2 * reg;
  if (grad) {
    // ∂V = R^T Z + l2 V,  ∂c = Σ_i R_i
    for (int64_t j = 0; j < int64_t(C) * d; ++j) grad[j] = l2 * V[j];
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, C, int(d), int(n), 1.0, L.data(), C, Z, int(d), 1.0, grad,
                int(d));
    double* gc = grad + int64_t(C) * d;
    std::fill(gc, gc + C, 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int k = 0; k < C; ++k) gc[k] += L[size_t(i * C + k)];
  }
  return loss;
}

namespace {

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double v : a) m = std::max(m, std::fabs(v));
  return m;
}

}  // namespace

SoftmaxFit fit_softmax_regression(const double* X, int64_t n, int64_t d, const double* Y, int C,
                                  const double* row_w, const SoftmaxFitOptions& o) {
  ATMOE_ASSERT(n >= 1 && d >= 1 && C >= 2 && o.l2 > 0);
  // Standardise the columns on the weighted rows.
  double wsum = 0;
  for (int64_t i = 0; i < n; ++i) wsum += row_w ? row_w[i] : 1.0;
  ATMOE_ASSERT(wsum > 0);
  std::vector<double> mu(size_t(d), 0.0), sd(size_t(d), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const double wi = (row_w ? row_w[i] : 1.0) / wsum;
    for (int64_t j = 0; j < d; ++j) mu[size_t(j)] += wi * X[i * d + j];
  }
  for (int64_t i = 0; i < n; ++i) {
    const double wi = (row_w ? row_w[i] : 1.0) / wsum;
    for (int64_t j = 0; j < d; ++j) {
      const double t = X[i * d + j] - mu[size_t(j)];
      sd[size_t(j)] += wi * t * t;
    }
  }
  for (auto& s : sd) s = s > 0 ? std::sqrt(s) : 0.0;
  double sd_max = *std::max_element(sd.begin(), sd.end());
  for (auto& s : sd) s = s > 1e-12 * std::max(sd_max, 1e-300) ? s : 1.0;
  std::vector<double> Z(size_t(n * d));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) Z[size_t(i * d + j)] = (X[i * d + j] - mu[size_t(j)]) / sd[size_t(j)];

  // L-BFGS (memory 10) with a backtracking Armijo line search; x = [V, c].
  const int64_t P = int64_t(C) * d + C;
  const size_t NP = static_cast<size_t>(P);
  std::vector<double> x(NP, 0.0), g(NP), xn(NP), gn(NP), p(NP);
  auto eval = [&](const std::vector<double>& at, std::vector<double>& grad) {
    return softmax_objective(Z.data(), n, d, Y, C, row_w, o.l2, at.data(), at.data() + int64_t(C) * d, grad.data());
  };
  double f = eval(x, g);
  std::deque<std::pair<std::vector<double>, std::vector<double>>> hist;  // (s, y)
  SoftmaxFit r;
  int it = 0;
  for (; it < o.max_iter; ++it) {
    if (max_abs(g) < o.grad_tol) {
      r.converged = true;
      break;
    }
    // Two-loop recursion: p = −H g.
    p = g;
    std::vector<double> alpha(hist.size());
    for (size_t k = hist.size(); k-- > 0;) {
      const auto& [s, y] = hist[k];
      alpha[k] = dot(s, p) / dot(y, s);
      for (int64_t j = 0; j < P; ++j) p[size_t(j)] -= alpha[k] * y[size_t(j)];
    }
    if (!hist.empty()) {
      const auto& [s, y] = hist.back();
      const double gamma = dot(s, y) / dot(y, y);
      for (auto& v : p) v *= gamma;
    }
    for (size_t k = 0; k < hist.size(); ++k) {
      const auto& [s, y] = hist[k];
      const double beta = dot(y, p) / dot(y, s);
      for (int64_t j = 0; j < P; ++j) p[size_t(j)] += s[size_t(j)] * (alpha[k] - beta);
    }
    for (auto& v : p) v = -v;
    double gp = dot(g, p);
    if (!(gp < 0)) {  // not a descent direction: restart from steepest descent
      hist.clear();
      for (int64_t j = 0; j < P; ++j) p[size_t(j)] = -g[size_t(j)];
      gp = dot(g, p);
    }
    double t = hist.empty() ? std::min(1.0, 1.0 / std::sqrt(dot(g, g))) : 1.0;
    double fn = 0;
    bool ok = false;
    for (int ls = 0; ls < 60; ++ls, t *= 0.5) {
      for (int64_t j = 0; j < P; ++j) xn[size_t(j)] = x[size_t(j)] + t * p[size_t(j)];
      fn = eval(xn, gn);
      if (fn <= f + 1e-4 * t * gp) {
        ok = true;
        break;
      }
    }
    if (!ok) break;  // no decrease representable in float64: at the minimum to rounding
    std::vector<double> s(NP), y(NP);
    for (int64_t j = 0; j < P; ++j) s[size_t(j)] = xn[size_t(j)] - x[size_t(j)], y[size_t(j)] = gn[size_t(j)] - g[size_t(j)];
    if (dot(s, y) > 1e-300) {
      hist.emplace_back(std::move(s), std::move(y));
      if (hist.size() > 10) hist.pop_front();
    }
    x.swap(xn);
    g.swap(gn);
    f = fn;
  }
  r.iterations = it;
  r.loss = f;
  r.grad_max = max_abs(g);
  r.converged = r.converged || r.grad_max < o.grad_tol;
  // Back to raw features.
  r.W.assign(size_t(C) * size_t(d), 0.0);
  r.b.assign(size_t(C), 0.0);
  for (int k = 0; k < C; ++k) {
    double bk = x[size_t(int64_t(C) * d + k)];
    for (int64_t j = 0; j < d; ++j) {
      const double wkj = x[size_t(k * d + j)] / sd[size_t(j)];
      r.W[size_t(k * d + j)] = wkj;
      bk -= wkj * mu[size_t(j)];
    }
    r.b[size_t(k)] = bk;
  }
  return r;
}

namespace {

double sqdist(const double* a, const double* b, int64_t d) {
  double s = 0;
  for (int64_t j = 0; j < d; ++j) {
    const double t = a[j] - b[j];
    s += t * t;
  }
  return s;
}

// Uniform in [0, 1) from 53 bits: the same on every standard library (unlike <random>'s distributions).
double unit(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }

}  // namespace

KMeansResult kmeans_from(const double* X, int64_t n, int64_t d, std::vector<double> cen, int K, int max_iter) {
  ATMOE_ASSERT(K >= 1 && n >= K && int64_t(cen.size()) == K * d);
  KMeansResult r;
  r.assign.assign(size_t(n), -1);
  std::vector<double> dist(static_cast<size_t>(n));
  int it = 0;
  for (;; ++it) {
    bool changed = false;
    for (int64_t i = 0; i < n; ++i) {
      int best = 0;
      double bd = INFINITY;
      for (int k = 0; k < K; ++k) {
        const double s = sqdist(X + i * d, &cen[size_t(k * d)], d);
        if (s < bd) bd = s, best = k;
      }
      dist[size_t(i)] = bd;
      changed = changed || r.assign[size_t(i)] != best;
      r.assign[size_t(i)] = best;
    }
    if (!changed) {
      r.converged = true;
      break;
    }
    if (it == max_iter) break;
    // Means; an empty cluster takes the point farthest from its centre.
    std::vector<int64_t> cnt(size_t(K), 0);
    for (int64_t i = 0; i < n; ++i) ++cnt[size_t(r.assign[size_t(i)])];
    for (int k = 0; k < K; ++k) {
      if (cnt[size_t(k)] > 0) continue;
      int64_t far = -1;
      for (int64_t i = 0; i < n; ++i)
        if (cnt[size_t(r.assign[size_t(i)])] > 1 && (far < 0 || dist[size_t(i)] > dist[size_t(far)])) far = i;
      if (far < 0) break;  // every point is alone in its cluster: fewer distinct points than K
      --cnt[size_t(r.assign[size_t(far)])];
      r.assign[size_t(far)] = k;
      cnt[size_t(k)] = 1;
      dist[size_t(far)] = 0;
    }
    std::fill(cen.begin(), cen.end(), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d; ++j) cen[size_t(r.assign[size_t(i)] * d + j)] += X[i * d + j];
    for (int k = 0; k < K; ++k)
      for (int64_t j = 0; j < d; ++j) cen[size_t(k * d + j)] /= double(std::max<int64_t>(1, cnt[size_t(k)]));
  }
  r.iterations = it;
  r.centroids = std::move(cen);
  r.sizes.assign(size_t(K), 0);
  r.inertia = 0;
  for (int64_t i = 0; i < n; ++i) {
    ++r.sizes[size_t(r.assign[size_t(i)])];
    r.inertia += sqdist(X + i * d, &r.centroids[size_t(r.assign[size_t(i)] * d)], d);
  }
  return r;
}

KMeansResult kmeans(const double* X, int64_t n, int64_t d, int K, uint64_t seed, int max_iter, int restarts) {
  ATMOE_ASSERT(K >= 1 && n >= K && restarts >= 1);
  std::mt19937_64 rng(seed);
  // Greedy k-means++ (as scikit-learn): each new centre is the best of 2 + ln K candidates
  // drawn by D² sampling, the one that lowers the potential Σ D² most.
  const int trials = 2 + int(std::log(double(K)));
  KMeansResult best;
  for (int run = 0; run < restarts; ++run) {
    std::vector<double> cen(static_cast<size_t>(K * d));
    std::vector<double> d2(static_cast<size_t>(n), INFINITY), cand_d2(static_cast<size_t>(n)), best_d2(static_cast<size_t>(n));
    int64_t pick = int64_t(rng() % uint64_t(n));
    for (int64_t i = 0; i < n; ++i) d2[size_t(i)] = sqdist(X + i * d, X + pick * d, d);
    std::copy(X + pick * d, X + (pick + 1) * d, cen.begin());
    for (int k = 1; k < K; ++k) {
      double sum = 0;
      for (double v : d2) sum += v;
      double best_pot = INFINITY;
      for (int t = 0; t < trials; ++t) {
        int64_t c = int64_t(rng() % uint64_t(n));
        if (sum > 0) {
          const double u = unit(rng) * sum;
          double acc = 0;
          c = n - 1;
          for (int64_t i = 0; i < n; ++i)
            if (u < (acc += d2[size_t(i)])) {
              c = i;
              break;
            }
        }
        double pot = 0;
        for (int64_t i = 0; i < n; ++i) pot += cand_d2[size_t(i)] = std::min(d2[size_t(i)], sqdist(X + i * d, X + c * d, d));
        if (pot < best_pot) best_pot = pot, pick = c, best_d2.swap(cand_d2);
      }
      d2.swap(best_d2);
      std::copy(X + pick * d, X + (pick + 1) * d, cen.begin() + int64_t(k) * d);
    }
    KMeansResult r = kmeans_from(X, n, d, std::move(cen), K, max_iter);
    if (run == 0 || r.inertia < best.inertia) best = std::move(r);
  }
  return best;
}

}  // namespace atmoe
