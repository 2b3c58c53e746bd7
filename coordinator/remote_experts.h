// The experts on worker ranks (DESIGN.md 3): an ExpertBackend that, per site input, sends
// each worker the activations and coefficient rows of the tokens that use its experts
// (common/wire.h), lets the base GEMM run, then adds the workers' partial sums into y.
// Workers none of whose experts a step uses receive nothing and compute nothing.
//
// Construction is the session's start: hello to every worker with its placement, then
// every Ready within ATMOE_LOAD_TIMEOUT; a worker that fails to load ends it with an
// InputError naming the rank and host. Every later wait is bounded by ATMOE_WORKER_TIMEOUT
// (PeerTimeout naming the rank). The destructor ends the session on the workers.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/bundle.h"
#include "common/comm_mpi.h"
#include "common/wire.h"
#include "common/model_config.h"
#include "coordinator/experts.h"
#include "coordinator/placement.h"

namespace atmoe {

class RemoteExperts : public ExpertBackend {
 public:
  // workers_ignore_sigterm: the session's workers ignore SIGTERM (a server drains on it:
  // the coordinator ends them when it is done).
  RemoteExperts(MpiSession& s, const Bundle& b, const ModelConfig& c, DType dtype, const Placement& p,
                bool workers_ignore_sigterm = false);
  ~RemoteExperts() override;

  void set_layer(int layer, const StepRouting& r) override;
  void post(int layer, SiteInput in, const float* x, int64_t ldx, const StepRouting& r) override;
  void wait(int layer, SiteInput in, float* y, int64_t ldy, const StepRouting& r) override;
  void end_step() override { ++step_; }
  // On the worker that holds the fewest bytes; InputError naming the worker when it fails there.
  // On the worker that holds `group` (the target group), else the one with the fewest bytes.
  std::string load_adapter(int col, const std::string& name, const std::string& dir, int group) override;
  void unload_adapter(int col) override;

  // Each worker's counters (Stats round trip), index = worker (rank - 1).
  std::vector<nlohmann::json> worker_stats();
  // Bytes this coordinator sent to each worker on the data plane.
  const std::vector<int64_t>& bytes_sent() const { return sent_; }
  // Bytes of partial sums received from each worker.
  const std::vector<int64_t>& bytes_received() const { return received_; }
  const std::vector<nlohmann::json>& ready() const { return ready_; }

 private:
  struct Worker {
    int rank = 0;
    std::vector<int> columns;     // bundle expert index per column (E: the general expert)
    std::vector<uint8_t> inputs;  // [L * 4]: the worker has rows for (layer, input)
    std::vector<uint8_t> base_inputs;                          // the bundle shard's
    std::vector<std::pair<int, std::vector<uint8_t>>> adapters;  // run-time adapters: (column, inputs)
    int64_t bytes = 0;
    std::vector<int> groups;  // bundle groups it holds
    std::vector<int32_t> toks;    // this layer: token rows that use the worker's experts
    std::vector<float> coef;      // this layer: [toks, columns]
    bool coef_sent = false;
    std::vector<uint8_t> msg, result;
    bool in_flight = false;
  };
  MpiSession& s_;
  SiteShapes shapes_;
  std::vector<Worker> w_;
  std::vector<nlohmann::json> ready_;
  std::vector<int64_t> sent_, received_;
  std::vector<Communicator::Request> reqs_;
  uint64_t step_ = 0;
  double worker_timeout_ = 60, load_timeout_ = 600;
  nlohmann::json adapter_call(Worker& wk, Msg kind, const nlohmann::json& j);
  void refresh_inputs(Worker& wk);
  bool ended_ = false;
  bool failed_ = false;
  bool poll_ = true;  // ATMOE_MPI_PROGRESS=poll: progress between the base GEMM's chunks  // a wait failed: requests may still own the buffers
  int64_t d_in(SiteInput in) const { return shapes_.d_in[size_t(input_first_site(in))]; }
  int64_t out_cols(SiteInput in) const;
};

// Tells every worker rank the job is over (final shutdown with `code`); idempotent. False
// when some worker could not take it (the caller aborts instead of MPI_Finalize).
bool end_workers(MpiSession& s, int code);

}  // namespace atmoe
