// The in-process expert pool of an AT-MoE bundle: every expert's LoRA weights stacked per
// (layer, site) for the shrink -> mix -> expand kernel (kernels/cpu/lora.h), the router,
// and the per-sequence routing state.
//
// Stack layout of one (layer, site): rows grouped by expert group, in manifest order;
// inside a group, each expert that targets this module contributes its rank r_e rows
// (heterogeneous ranks, no per-expert padding); each group's block is padded to a multiple
// of kPanel rows so a group is a whole number of panels (top-k groups select panel
// ranges). The general expert, when present, is one more block at the end.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "common/bundle.h"
#include "common/model_config.h"
#include "common/peft_adapter.h"
#include "coordinator/router.h"

namespace atmoe {

struct SiteStack {
  int64_t R = 0;                  // rows incl. padding (multiple of kPanel)
  int64_t d_in = 0, d_out = 0;
  Tensor A, B;                    // packed, model dtype: A [R, d_in], B [d_out, R]
  std::vector<int32_t> row_expert;  // [R]: expert index, E for the general expert, -1 padding
  std::vector<float> row_scale;     // [R]: the expert's LoRA scale s_e for this module
  std::vector<std::pair<int64_t, int64_t>> block;  // [G + 1]: row range of each group (+ general)
  std::vector<std::vector<int32_t>> block_experts; // [G + 1]: the experts with rows in each block
};

// Routing state of one sequence: its controls, and the per-request weights once computed.
struct SeqRouting {
  ResolvedRouting ctl;
  bool per_request_done = false;
  std::vector<std::vector<double>> a, w;  // [L][G], [L][E]: per_request weights (or per_token mean)
  bool trace_tokens = false;
  std::vector<std::vector<std::vector<double>>> tokens;         // per_token: [token][L][E]
  std::vector<std::vector<std::vector<double>>> tokens_groups;  // per_token: [token][L][G]
  int64_t n_token_steps = 0;                             // per_token: tokens accumulated into a/w
  // T-REX: the controls, and the cluster scores C e once known (empty until then).
  RoutingControls trex_ctl;
  bool trex_ready = false;
  std::vector<float> trex_ce;
};

class ExpertPool {
 public:
  // dtype: of the stacked LoRA weights (the model's: bf16 halves the bytes read per step).
  ExpertPool(const Bundle& b, const ModelConfig& c, DType dtype = DType::F32);
  const Bundle& bundle() const { return b_; }
  const Router& router() const { return *router_; }
  const SiteStack& stack(int layer, Site s) const { return stacks_[size_t(layer) * kNumSites + size_t(s)]; }
  int n_experts() const { return int(b_.experts.size()); }
  const std::vector<PeftAdapter>& adapters() const { return adapters_; }   // manifest order
  const PeftAdapter* general() const { return general_ ? general_.get() : nullptr; }
  std::unique_ptr<SeqRouting> new_routing(const RoutingControls& c) const;

 private:
  Bundle b_;
  std::vector<PeftAdapter> adapters_;
  std::unique_ptr<PeftAdapter> general_;
  std::unique_ptr<Router> router_;
  std::vector<SiteStack> stacks_;  // [L * kNumSites]
};

SiteShapes site_shapes(const ModelConfig& c);

}  // namespace atmoe
