// Token sampling from one row of logits [V]:
//   temperature <= 0 -> greedy (argmax, lowest id on ties);
//   else logits / T, keep the top_k largest (0 = all), softmax, keep the smallest prefix
//   (by descending probability) whose mass reaches top_p, renormalise, draw with rng.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace atmoe::cpu {

struct SamplingParams {
  float temperature = 0.f;
  int top_k = 0;
  float top_p = 1.f;
};

int32_t argmax(const float* logits, int64_t V);
// `scratch` is reused between calls to avoid allocation in the decode loop.
int32_t sample(const float* logits, int64_t V, const SamplingParams& sp, std::mt19937_64& rng,
               std::vector<std::pair<float, int32_t>>& scratch);

}  // namespace atmoe::cpu
