// The coordinator's side of an AT-MoE bundle (DESIGN.md 1.1, 3): the bundle, the grouped
// router, the per-sequence routing state and, per layer, the step's routing
// coefficients. Where the experts' LoRA banks live is an ExpertBackend: in this process
// (one ExpertShard of every group, N = 1) or on worker ranks (coordinator/remote_experts.h).
#pragma once
#include "kernels/backend.h"
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/bundle.h"
#include "common/model_config.h"
#include "common/peft_adapter.h"
#include "coordinator/expert_dispatch.h"
#include "coordinator/router.h"
#include "worker/expert_shard.h"

namespace atmoe {

// Routing state of one sequence: its controls, and the per-request weights once computed.
struct SeqRouting {
  ResolvedRouting ctl;
  bool per_request_done = false;
  std::vector<std::vector<double>> a, w;  // [L][G], [L][E]: per_request weights (or per_token mean)
  bool trace_tokens = false;
  std::vector<std::vector<std::vector<double>>> tokens;         // per_token: [token][L][E]
  std::vector<std::vector<std::vector<double>>> tokens_groups;  // per_token: [token][L][G]
  int64_t n_token_steps = 0;                                    // per_token: tokens accumulated into a/w
  // Router inputs kept for fitting (atmoe fit-router): per layer, the rows the router saw
  // (per_request: the prompt mean, once; per_token: every token's input), [L][rows * hidden].
  bool keep_inputs = false;
  std::vector<std::vector<float>> inputs;
  // T-REX: the controls, and the cluster scores C e once known (empty until then).
  RoutingControls trex_ctl;
  bool trex_ready = false;
  std::vector<float> trex_ce;
  // A run-time adapter served alone (the server's load_lora_adapter): its slot, and a lease
  // that keeps its weights while this request lives.
  int adapter_slot = -1;
  std::shared_ptr<const void> adapter_lease;
};

// The routing of one layer for the batch's token rows.
struct StepRouting {
  int64_t T = 0;
  int C = 0;                // E + 1 + adapter slots
  std::vector<float> coef;  // [T, C]: λ·w_l[e] for the experts in bundle order, (1 − λ) in column E,
                            // then one column per run-time adapter slot (1 for its requests' rows)
  bool active = false;      // some row routes through the experts
};

// Where the experts run. Called in the order route -> post -> wait of ExpertDispatch.
class ExpertBackend {
 public:
  virtual ~ExpertBackend() = default;
  virtual void set_layer(int layer, const StepRouting& r) = 0;
  virtual void post(int layer, SiteInput in, const float* x, int64_t ldx, const StepRouting& r) = 0;
  virtual void wait(int layer, SiteInput in, float* y, int64_t ldy, const StepRouting& r) = 0;
  virtual void end_step() {}
  // Run-time adapters: the PEFT adapter in `dir` becomes coefficient column `col`, beside
  // bundle group `group` (its target group for a later router fit; -1: none). Returns where
  // it landed ("rank 0", "rank 2"); InputError when it does not fit the model.
  virtual std::string load_adapter(int col, const std::string& name, const std::string& dir, int group) = 0;
  virtual void unload_adapter(int col) = 0;
};


// In this process: one shard of every group (and the general expert).
class LocalExperts : public ExpertBackend {
 public:
  // be: where the banks live and run (the model's backend when it is a device; nullptr: a
  // CPU context of the shard's own).
  LocalExperts(const Bundle& b, const ModelConfig& c, DType dtype, Backend* be = nullptr);
  const ExpertShard& shard() const { return shard_; }
  void set_layer(int layer, const StepRouting& r) override;
  void post(int layer, SiteInput in, const float* x, int64_t ldx, const StepRouting& r) override;
  void wait(int layer, SiteInput in, float* y, int64_t ldy, const StepRouting& r) override;
  std::string load_adapter(int col, const std::string& name, const std::string& dir, int group) override;
  void unload_adapter(int col) override;

 private:
  ExpertShard shard_;
  std::vector<std::pair<int, std::unique_ptr<ExpertShard>>> adapters_;  // (column, shard)
  std::vector<float> coef_;  // [T, shard columns + adapters]
  const float* x_ = nullptr;
  int64_t ldx_ = 0;
  bool posted_ = false;  // post() left the shard's experts pending (finish them in wait())
};

class ExpertPool : public ExpertDispatch {
 public:
  // dtype: of the stacked LoRA weights (the model's: bf16 halves the bytes read per step).
  // Experts in this process, on `be` (the model's backend when its memory is a device's;
  // nullptr: the CPU).
  // zero_router: an all-zero router, the router file not read (Router's `zero`).
  ExpertPool(const Bundle& b, const ModelConfig& c, DType dtype = DType::F32, bool zero_router = false,
             Backend* be = nullptr);
  // Experts behind `backend` (worker ranks).
  ExpertPool(const Bundle& b, const ModelConfig& c, std::unique_ptr<ExpertBackend> backend,
             bool zero_router = false);
  ~ExpertPool() override;

  const Bundle& bundle() const { return b_; }
  const Router& router() const { return *router_; }
  int n_experts() const { return int(b_.experts.size()); }
  // The in-process shard, or nullptr when the experts are remote.
  const ExpertShard* local_shard() const;
  ExpertBackend& backend() { return *backend_; }

  std::unique_ptr<SeqRouting> new_routing(const RoutingControls& c) const override;
  bool needs_whole_prompt() const override { return b_.router_input == RouterInput::PerRequest; }
  void route(int layer, const std::vector<ForwardItem>& items, const float* h, int64_t ldh, int64_t T) override;
  bool route_reads_rows(const std::vector<ForwardItem>& items) const override;
  void post(int layer, SiteInput in, const float* x, int64_t ldx, int64_t T) override;
  void wait(int layer, SiteInput in, float* y, int64_t ldy, int64_t T) override;
  void end_step() override {
    backend_->end_step();
    ++times_.steps;
  }

  // Run-time adapters (the server's /v1/load_lora_adapter): served by name, alone at weight
  // 1, never routed (the router knows only the bundle's experts). load: InputError when the
  // name is taken (a bundle expert or a loaded adapter), every slot is used, or the adapter
  // does not fit the model. unload: false for an unknown name; the adapter stops being
  // served at once, its weights go at the first collect() that finds no request holding it.
  // Engine thread only, between steps; the lookups below may run on any thread.
  struct AdapterInfo {
    std::string name, dir, group, where;  // group: the target group ("" for none)
  };
  void set_max_adapters(int n);
  // group: a bundle group name or "" (InputError naming it when unknown).
  void load_adapter(const std::string& name, const std::string& dir, const std::string& group);
  bool unload_adapter(const std::string& name);
  void collect_adapters();
  bool has_adapter(const std::string& name) const;
  std::vector<AdapterInfo> adapters() const;

 private:
  struct Slot {
    AdapterInfo info;
    bool live = false;    // served by name
    bool loaded = false;  // weights held by the backend
    std::shared_ptr<const void> lease;
  };
  mutable std::mutex slots_mu_;
  std::vector<Slot> slots_;
  Bundle b_;
  int n_layers_ = 0;
  int64_t hidden_ = 0;
  std::unique_ptr<Router> router_;
  std::unique_ptr<ExpertBackend> backend_;
  StepRouting step_;
  std::vector<double> ra_, rw_;
  std::vector<float> umean_;
};

}  // namespace atmoe
