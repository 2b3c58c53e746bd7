#include "kernels/cpu/sampling.h"

#include <algorithm>
#include <cmath>

namespace atmoe::cpu {

int32_t argmax(const float* logits, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (logits[i] > logits[best]) best = i;
  return int32_t(best);
}

namespace {

// Draws from the first n entries of c (unnormalised weights).
int32_t draw(const std::vector<std::pair<float, int32_t>>& c, size_t n, std::mt19937_64& rng) {
  double mass = 0;
  for (size_t i = 0; i < n; ++i) mass += c[i].first;
  double r = std::uniform_real_distribution<double>(0.0, mass)(rng);
  for (size_t i = 0; i < n; ++i) {
    r -= c[i].first;
    if (r <= 0) return c[i].second;
  }
  return c[n - 1].second;
}

}  // namespace

int32_t sample(const float* logits, int64_t V, const SamplingParams& sp, std::mt19937_64& rng,
               std::vector<std::pair<float, int32_t>>& c) {
  // Below 1e-5 the division overflows logits to inf (a subnormal temperature gave NaN
  // probabilities): that is greedy decoding anyway.
  if (!(sp.temperature >= 1e-5f) || sp.top_k == 1) return argmax(logits, V);
  const float inv_t = 1.f / sp.temperature;
  float m = -INFINITY;
  for (int64_t i = 0; i < V; ++i) m = std::max(m, logits[i]);
  c.resize(size_t(V));
  for (int64_t i = 0; i < V; ++i) c[size_t(i)] = {std::exp((logits[i] - m) * inv_t), int32_t(i)};
  const bool top_k = sp.top_k > 0 && sp.top_k < V;
  if (!top_k && sp.top_p >= 1.f && sp.min_p <= 0.f) return draw(c, c.size(), rng);  // no truncation: no sort
  // min_p first (vLLM's order): p >= min_p * p_max, i.e. weight >= min_p (the largest
  // weight is exp(0) = 1); then top_k and top_p over what is left.
  size_t n = c.size();
  if (sp.min_p > 0.f)
    n = size_t(std::partition(c.begin(), c.end(), [&](const auto& e) { return e.first >= sp.min_p; }) - c.begin());
  if (n == 0) return argmax(logits, V);  // nothing passes (NaN logits): greedy
  auto desc = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t k = top_k ? std::min(n, size_t(sp.top_k)) : n;
  if (k < n) {
    std::partial_sort(c.begin(), c.begin() + long(k), c.begin() + long(n), desc);
  } else {
    std::sort(c.begin(), c.begin() + long(n), desc);
  }
  size_t keep = k;
  if (sp.top_p < 1.f) {
    double sum = 0;
    for (size_t i = 0; i < k; ++i) sum += c[i].first;
    double acc = 0;
    for (size_t i = 0; i < k; ++i) {
      acc += c[i].first / sum;
      if (acc >= sp.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  return draw(c, keep, rng);
}

int32_t sample_with_u(const float* logits, int64_t V, float temperature, int top_k, float top_p, float min_p, double u,
                      std::vector<std::pair<float, int32_t>>& c) {
  if (!(temperature >= 1e-5f) || top_k == 1) return argmax(logits, V);
  const float inv_t = 1.f / temperature;
  float m = -INFINITY;
  for (int64_t i = 0; i < V; ++i) m = std::max(m, logits[i]);
  c.resize(size_t(V));
  for (int64_t i = 0; i < V; ++i) c[size_t(i)] = {std::exp((logits[i] - m) * inv_t), int32_t(i)};
  size_t n = c.size();
  if (min_p > 0.f)
    n = size_t(std::partition(c.begin(), c.end(), [&](const auto& e) { return e.first >= min_p; }) - c.begin());
  if (n == 0) return argmax(logits, V);  // nothing passes (NaN logits): greedy
  auto desc = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  const size_t k = top_k > 0 ? std::min(n, size_t(top_k)) : n;
  if (k < n)
    std::partial_sort(c.begin(), c.begin() + long(k), c.begin() + long(n), desc);
  else
    std::sort(c.begin(), c.begin() + long(n), desc);
  double sum = 0;
  for (size_t i = 0; i < k; ++i) sum += c[i].first;
  size_t keep = k;
  if (top_p < 1.f) {
    double acc = 0;
    for (size_t i = 0; i < k; ++i) {
      acc += c[i].first / sum;
      if (acc >= top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) mass += c[i].first;
  const double r = u * mass;
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += c[i].first;
    if (acc > r) return c[i].second;
  }
  return c[keep - 1].second;
}

void apply_penalties(float* logits, int64_t V, const LogitPenalties& p, const int32_t* counts,
                     const uint8_t* in_prompt) {
  for (int64_t t = 0; t < V; ++t) {
    const int32_t n = counts ? counts[t] : 0;
    if (p.repetition != 1.f && (n > 0 || (in_prompt && in_prompt[t])))
      logits[t] = logits[t] > 0 ? logits[t] / p.repetition : logits[t] * p.repetition;
    if (n > 0) logits[t] -= p.frequency * float(n) + p.presence;
  }
}

void logprobs(const float* logits, int64_t V, int32_t token, int top_n, TokenLogprob& out,
              std::vector<std::pair<float, int32_t>>& c) {
  float m = -INFINITY;
  for (int64_t i = 0; i < V; ++i) m = std::max(m, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(double(logits[i] - m));
  const float lse = m + float(std::log(sum));
  out.token = token;
  out.logprob = logits[token] - lse;
  out.top.clear();
  if (top_n <= 0) return;
  c.resize(size_t(V));
  for (int64_t i = 0; i < V; ++i) c[size_t(i)] = {logits[i], int32_t(i)};
  const size_t k = std::min(size_t(top_n), size_t(V));
  std::partial_sort(c.begin(), c.begin() + long(k), c.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  for (size_t i = 0; i < k; ++i) out.top.emplace_back(c[i].second, c[i].first - lse);
}

}  // namespace atmoe::cpu
