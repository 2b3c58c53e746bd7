// T-REX checkpoints as the released code (RoyZry98/T-REX-Pytorch, a PEFT fork) writes them:
// an adapter directory with adapter_config.json (r, lora_alpha, target_modules),
// global_external_config.json (moe_mode rank1 | rank1_flex, rank1_flex_rank_allocation
// [r1, r2], router_mapping) and adapter_model.safetensors holding, per adapted module M:
//   M.lora_A[.name].weight                   [r1, d_in]
//   M.lora_B[.name].weight                   [d_out, r2]
//   M.router[...].weight                     [E, d_in], E = r1·r2 (rank1: E = r1 = r2 = r)
//   M.omg[...].weight                        [1, 1]   ω
//   M.binary_main_gate_weight[...].weight    [1, 1]   γ
//   M.rank1_flex_mapper[...].weight          [E, K]   (router_mapping only)
// "[...]" may be PEFT's "modules_to_save.<name>" (preferred) or nothing.
#pragma once
#include <map>
#include <string>

#include "common/peft_adapter.h"
#include "common/tensor.h"

namespace atmoe {

struct TrexModule {
  Tensor A, B, Wr, M;  // f32; M undefined without router_mapping
  double omega = 0, gamma = 0;
};

struct TrexAdapter {
  std::string dir, mode;  // rank1 | rank1_flex
  int r1 = 0, r2 = 0, E = 0;
  bool mapper = false;
  std::map<std::pair<int, Site>, TrexModule> modules;
  int64_t param_bytes() const;
};

TrexAdapter load_trex_adapter(const std::string& dir, const SiteShapes& shapes);

}  // namespace atmoe
