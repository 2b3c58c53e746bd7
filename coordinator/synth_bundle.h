// Deterministic synthetic bundles for tests and demos: random PEFT LoRA experts (standard
// adapter_config.json + adapter_model.safetensors with PEFT key names) in named groups,
// per-layer routers, and atmoe.json, for a given base model. Same options, same bytes.
#pragma once
#include <cstdint>
#include <string>

namespace atmoe {

struct SynthBundleOptions {
  std::string base, out, targets = "q,k,v,o,gate,up,down", method = "at-moe", ranks = "8", input = "per_request";
  int groups = 4, per_group = 2;
  uint64_t seed = 0;
  bool general = false;
  double b_std = 0.02, router_gain = 2.0;
  // method t-rex: the released checkpoint format (common/trex_adapter.h).
  std::string trex_mode = "rank1_flex";     // rank1 | rank1_flex (ranks: "r" or "r1,r2")
  bool router_mapping = false;              // a mapper [E, 32] from 32 centroids
  std::string intuition = "hidden_state";   // hidden_state | embedding
  int intuition_layer = -1;                 // -1: n_layers / 4
  int embedding_dim = 64;                   // d_e for the embedding source
};

void synth_bundle(const SynthBundleOptions& o);

}  // namespace atmoe
