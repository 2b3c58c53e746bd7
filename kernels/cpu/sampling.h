// Token sampling from one row of logits [V]:
//   temperature <= 0 -> greedy (argmax, lowest id on ties);
//   else logits / T, softmax; drop tokens below min_p times the most probable one's
//   probability; of the rest keep the top_k largest (0 = all), then the smallest prefix (by
//   descending probability) whose mass reaches top_p; renormalise, draw with rng.
// Logit processors that run before it (vLLM's order): logit_bias, then the penalties.
// Log-probabilities reported to clients are those of the raw logits (vLLM's default).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace atmoe::cpu {

struct SamplingParams {
  float temperature = 0.f;
  int top_k = 0;
  float top_p = 1.f;
  float min_p = 0.f;
};

// OpenAI's presence/frequency penalties (on tokens of the output so far) and the HF/vLLM
// repetition penalty (on tokens of the prompt or the output: a positive logit divided by
// it, a negative one multiplied).
struct LogitPenalties {
  float presence = 0.f, frequency = 0.f, repetition = 1.f;
  bool active() const { return presence != 0.f || frequency != 0.f || repetition != 1.f; }
};
// counts[t]: how often t occurs in the output so far; in_prompt[t]: t occurs in the prompt.
void apply_penalties(float* logits, int64_t V, const LogitPenalties& p, const int32_t* counts,
                     const uint8_t* in_prompt);

// The log-probability of `token` under softmax(logits), and the top_n most probable tokens
// with theirs (descending; top_n = 0: none).
struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0.f;
  std::vector<std::pair<int32_t, float>> top;
};
void logprobs(const float* logits, int64_t V, int32_t token, int top_n, TokenLogprob& out,
              std::vector<std::pair<float, int32_t>>& scratch);

int32_t argmax(const float* logits, int64_t V);
// The backends' sample op (ops::SampleParams): the same truncation as sample(), then the
// candidates in descending probability (ties by id) and the first whose cumulative mass
// exceeds u · (kept mass), u in [0, 1). Deterministic given u, so every backend gives the
// same token for the same draw.
int32_t sample_with_u(const float* logits, int64_t V, float temperature, int top_k, float top_p, float min_p, double u,
                      std::vector<std::pair<float, int32_t>>& scratch);
// `scratch` is reused between calls to avoid allocation in the decode loop.
int32_t sample(const float* logits, int64_t V, const SamplingParams& sp, std::mt19937_64& rng,
               std::vector<std::pair<float, int32_t>>& scratch);

}  // namespace atmoe::cpu
