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

int32_t sample(const float* logits, int64_t V, const SamplingParams& sp, std::mt19937_64& rng,
               std::vector<std::pair<float, int32_t>>& c) {
  // Below 1e-5 the division overflows logits to inf (a subnormal temperature gave NaN
  // probabilities): that is greedy decoding anyway.
  if (!(sp.temperature >= 1e-5f) || sp.top_k == 1) return argmax(logits, V);
  c.resize(size_t(V));
  for (int64_t i = 0; i < V; ++i) c[size_t(i)] = {logits[i] / sp.temperature, int32_t(i)};
  auto desc = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t k = (sp.top_k > 0 && sp.top_k < V) ? size_t(sp.top_k) : size_t(V);
  if (k < c.size()) {
    std::partial_sort(c.begin(), c.begin() + long(k), c.end(), desc);
    c.resize(k);
  } else {
    std::sort(c.begin(), c.end(), desc);
  }
  float m = c[0].first;
  double sum = 0;
  for (auto& e : c) sum += (e.first = std::exp(e.first - m));
  size_t keep = c.size();
  if (sp.top_p < 1.f) {
    double acc = 0;
    for (size_t i = 0; i < c.size(); ++i) {
      acc += c[i].first / sum;
      if (acc >= sp.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) mass += c[i].first;
  double r = std::uniform_real_distribution<double>(0.0, mass)(rng);
  for (size_t i = 0; i < keep; ++i) {
    r -= c[i].first;
    if (r <= 0) return c[i].second;
  }
  return c[keep - 1].second;
}

}  // namespace atmoe::cpu
