// Generation requests and results, and Engine: a batch of requests run to completion by
// the scheduler's continuous batching (each step packs the decode token of every running
// sequence plus prefill chunks of waiting prompts into one Model::forward).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "coordinator/experts.h"
#include "coordinator/model.h"
#include "kernels/cpu/sampling.h"

namespace atmoe {

struct GenerateRequest {
  std::vector<int32_t> prompt;
  cpu::SamplingParams sampling;
  cpu::LogitPenalties penalties;
  std::vector<std::pair<int32_t, float>> logit_bias;  // added to a token's logit before sampling
  int logprobs = -1;  // >= 0: each token's log-probability and the top `logprobs` alternatives
  uint64_t seed = 0;
  int max_tokens = 128;
  std::vector<std::string> stop;  // stop strings (not included in the output)
  bool ignore_eos = false;        // benchmarks: run to max_tokens
  // Bundles: route this request through the experts with these controls (ignored when the
  // model has no experts attached). trace_tokens keeps per-token weights (per_token routing).
  bool use_experts = true;
  RoutingControls routing;
  bool trace_tokens = false;
};

struct GenerateResult {
  std::vector<int32_t> tokens;
  std::string text;
  std::string finish_reason;  // "stop" | "length" | "cancelled"
  std::vector<cpu::TokenLogprob> logprobs;  // one per token when asked (request.logprobs >= 0)
  int64_t prompt_tokens = 0;
  std::shared_ptr<SeqRouting> routing;  // the routing weights used (bundles), for traces
};

struct EngineOptions {
  int64_t max_batch_tokens = 512;              // tokens per forward step (prefill chunking)
  int max_running = 64;                        // sequences decoding at once
  int64_t kv_budget_bytes = INT64_MAX;         // KV caches of the running sequences (no bound)
};

// A fixed list of requests run to completion on a Scheduler (coordinator/scheduler.h).
class Engine {
 public:
  explicit Engine(Model& m, EngineOptions o = {}) : m_(m), o_(o) {}
  // Validates every request first (InputError "request i: ..."), then runs them all.
  // Streams text deltas through on_text(request index, delta) when given.
  std::vector<GenerateResult> run(const std::vector<GenerateRequest>& reqs,
                                  const std::function<void(size_t, const std::string&)>& on_text = {});

 private:
  Model& m_;
  EngineOptions o_;
};

}  // namespace atmoe
