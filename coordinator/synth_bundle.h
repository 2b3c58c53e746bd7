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
};

void synth_bundle(const SynthBundleOptions& o);

}  // namespace atmoe
