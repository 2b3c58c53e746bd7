// The live request loop that generate, batch and serve all drive (DESIGN.md 5): requests
// are submitted and cancelled at any time; each step() is one Model::forward over the
// decode token of every running request plus prompt chunks of newly admitted ones.
//
// Admission happens at step boundaries, in submission order, while three budgets allow:
//   - tokens per step (max_batch_tokens): decode tokens first, then prefill chunks;
//   - running requests (max_running);
//   - KV-cache memory (kv_budget_bytes): a request is admitted only when the KV cache of
//     its prompt + max_tokens fits beside the caches of the running ones, and its cache
//     is allocated whole at admission, so an admitted request never runs out of memory.
// A request that could never fit (its KV cache alone is over the budget) is refused at
// submit; the others wait, in order (none is dropped). A full queue is refused at submit
// (QueueFull: HTTP 429). Requests are validated at submit, so a bad one fails alone.
//
// Per-request routing (AT-MoE per_request) takes the router input from the whole prompt,
// so such a prompt is prefilled in one forward even when it is longer than the step's
// token budget: that step then takes longer, and every running stream waits for it (one
// step of prefill; docs/usage.md).
//
// Under mpirun the scheduler runs on rank 0 and its forwards are the only thing that
// talks to the workers: they follow step by step and end with it.
//
// Not thread-safe: submit, cancel and step run on one thread (a server hands requests and
// cancellations to that thread). Decode tokens are never deferred: with more running
// requests than max_batch_tokens a step holds one token per running request.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/error.h"
#include "coordinator/engine.h"
#include "kernels/cpu/sampling.h"

namespace atmoe {

// submit() while max_queue requests already wait (HTTP 429).
class QueueFull : public Error {
 public:
  using Error::Error;
};

struct SchedulerOptions {
  int64_t max_batch_tokens = 512;               // tokens per forward (prefill chunking)
  int max_running = 64;                         // requests decoding at once
  int64_t kv_budget_bytes = int64_t(4) << 30;   // KV caches of the running requests
  size_t max_queue = 4096;                      // requests waiting for admission
};

using RequestId = uint64_t;

struct RequestEvents {
  // Each generated token (not an end-of-generation one), as it is sampled; lp: its
  // log-probabilities when the request asks for them, else nullptr.
  std::function<void(int32_t token, const cpu::TokenLogprob* lp)> on_token;
  // Text as it becomes final (stop strings held back until they cannot match).
  std::function<void(const std::string& delta)> on_text;
  // Once per request: finish_reason "stop", "length" or "cancelled".
  std::function<void(const GenerateResult& r)> on_finish;
};

class Scheduler {
 public:
  explicit Scheduler(Model& m, SchedulerOptions o = {});
  ~Scheduler();

  // Validates the request (InputError naming the field) and queues it. QueueFull when
  // max_queue requests wait. max_tokens = 0 finishes at once ("length"), before returning.
  RequestId submit(GenerateRequest r, RequestEvents ev);
  // Ends a request: a waiting one at once, a running one at the next step() boundary (its
  // on_finish then runs with "cancelled" and the text so far). False when the id is
  // unknown, already finished or already cancelled.
  bool cancel(RequestId id);
  // One forward; admitted and finished requests are settled before it returns (on_text /
  // on_finish run on this thread). False when there was nothing to run.
  bool step();
  bool idle() const { return waiting_.empty() && running_.empty(); }

  // Observability (metrics, logs).
  size_t waiting() const { return waiting_.size(); }
  size_t running() const { return running_.size(); }
  int64_t kv_reserved_bytes() const { return kv_reserved_; }
  int64_t last_step_tokens() const { return last_step_tokens_; }
  const SchedulerOptions& options() const { return o_; }
  // Bytes of KV cache a request of n tokens (prompt + max_tokens) takes.
  int64_t kv_bytes(int64_t n_tokens) const;

 private:
  struct Seq;
  void finish(Seq& s, const char* why);
  void emit(Seq& s, bool final);

  Model& m_;
  SchedulerOptions o_;
  RequestId next_id_ = 1;
  std::deque<std::unique_ptr<Seq>> waiting_;
  std::vector<std::unique_ptr<Seq>> running_;
  int64_t kv_reserved_ = 0;
  int64_t last_step_tokens_ = 0;
  std::vector<ForwardItem> items_;
  std::vector<Seq*> owners_;
  std::vector<float> logits_, row_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

}  // namespace atmoe
