// PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors, as written by
// `peft.PeftModel.save_pretrained` for a Llama-family base.
//
// Supported config: peft_type LORA, r, lora_alpha, use_rslora, target_modules (list of
// module names, or a regex string matched against the full module name), rank_pattern and
// alpha_pattern (keys matched as PEFT does: the module name ends with the key), fan_in_fan_out,
// bias "none", layers_to_transform. Refused with an error naming the field: DoRA
// (use_dora), trained biases (bias != none), modules_to_save, LoRA on embeddings or lm_head.
// Tensor keys: base_model.model.model.layers.{L}.{self_attn|mlp}.{M}_proj.lora_{A|B}[.NAME].weight
//   lora_A: [r, d_in], lora_B: [d_out, r] (transposed on disk when fan_in_fan_out).
#pragma once
#include <array>
#include <map>
#include <string>
#include <vector>

#include "common/tensor.h"

namespace atmoe {

// Adapted modules ("sites") of a decoder layer, in a fixed order.
enum class Site : int { Q = 0, K, V, O, Gate, Up, Down };
constexpr int kNumSites = 7;
const char* site_name(Site s);       // "q", "k", ...
const char* site_module(Site s);     // "q_proj", ...
bool parse_site(const std::string& s, Site* out);  // accepts "q" or "q_proj"

// The four distinct activations that feed the sites of a layer (DESIGN.md 1): attn_in
// (q,k,v), attn_out (o), mlp_in (gate,up), mlp_act (down). The deltas of an input's sites
// are laid side by side in site order, as the model fuses them: q|k|v, o, gate|up, down.
enum class SiteInput : int { AttnIn = 0, AttnOut, MlpIn, MlpAct };
constexpr int kNumSiteInputs = 4;
const char* site_input_name(SiteInput in);  // "attn_in", ...
inline SiteInput site_input(Site s) {
  return s <= Site::V ? SiteInput::AttnIn : s == Site::O ? SiteInput::AttnOut : s == Site::Down ? SiteInput::MlpAct : SiteInput::MlpIn;
}
// Sites of an input: [first, first + count).
inline Site input_first_site(SiteInput in) {
  constexpr Site first[] = {Site::Q, Site::O, Site::Gate, Site::Down};
  return first[int(in)];
}
inline int input_site_count(SiteInput in) {
  constexpr int n[] = {3, 1, 2, 1};
  return n[int(in)];
}

constexpr int kMaxLoraRank = 4096;

// The LoRA scale: alpha / r, or alpha / sqrt(r) with rslora. The one place it is computed.
double lora_scale(double alpha, int r, bool rslora);

struct LoraWeights {
  int rank = 0;
  double scale = 0;  // from lora_scale(); the routing weight multiplies it at run time
  Tensor A;          // f32 [r, d_in]
  Tensor B;          // f32 [d_out, r]
};

struct PeftAdapter {
  std::string name, dir;
  int default_rank = 0;
  double default_alpha = 0;
  bool rslora = false;
  // (layer, site) -> weights; absent when the adapter does not target that module.
  std::map<std::pair<int, Site>, LoraWeights> modules;
  int64_t param_bytes() const;
  std::vector<Site> sites() const;  // the distinct sites targeted
};

// Loads and checks against the base shapes: d_in/d_out per site from the model config.
struct SiteShapes {
  int n_layers = 0;
  std::array<int64_t, kNumSites> d_in{}, d_out{};
};
PeftAdapter load_peft_adapter(const std::string& dir, const std::string& name, const SiteShapes& shapes);

}  // namespace atmoe
