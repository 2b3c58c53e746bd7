// libFuzzer: a PEFT LoRA adapter directory. Input layout (tests/fuzz/make_seeds.py):
//   u32 little-endian N | N bytes adapter_config.json | adapter_model.safetensors (the rest)
// (N larger than what follows takes all of it as JSON, with an empty safetensors file).
// load_peft_adapter either returns modules of the declared shapes with a finite scale, or
// raises InputError. Base shapes: a tiny Llama, 2 layers, hidden 16, 4 heads of 4 with 2
// KV heads (k/v out 8), FFN 32.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "common/error.h"
#include "common/peft_adapter.h"
#include "tests/fuzz/fuzz_files.h"

namespace {
atmoe::SiteShapes tiny_llama() {
  atmoe::SiteShapes s;
  s.n_layers = 2;
  //         q   k   v   o  gate up  down
  s.d_in = {16, 16, 16, 16, 16, 16, 32};
  s.d_out = {16, 8, 8, 16, 32, 32, 16};
  return s;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const atmoe::SiteShapes shapes = tiny_llama();
  const std::string dir = atmoe::fuzz::scratch_dir() + "/adapter";
  static const bool made = (atmoe::fuzz::make_dirs(dir), true);
  (void)made;
  if (size < 4) return 0;
  uint32_t n = 0;
  std::memcpy(&n, data, 4);  // little-endian hosts only (x86-64, aarch64)
  const size_t json_len = n < size - 4 ? n : size - 4;
  atmoe::fuzz::put_file(dir + "/adapter_config.json", data + 4, json_len);
  atmoe::fuzz::put_file(dir + "/adapter_model.safetensors", data + 4 + json_len, size - 4 - json_len);
  try {
    atmoe::PeftAdapter a = atmoe::load_peft_adapter(dir, "fuzz", shapes);
    if (a.modules.empty()) __builtin_trap();
    for (const auto& [key, w] : a.modules) {
      const auto [layer, site] = key;
      const int s = int(site);
      if (layer < 0 || layer >= shapes.n_layers || s < 0 || s >= atmoe::kNumSites) __builtin_trap();
      if (w.rank < 1 || w.rank > atmoe::kMaxLoraRank || !std::isfinite(w.scale)) __builtin_trap();
      if (w.A.shape() != std::vector<int64_t>{w.rank, shapes.d_in[size_t(s)]}) __builtin_trap();
      if (w.B.shape() != std::vector<int64_t>{shapes.d_out[size_t(s)], w.rank}) __builtin_trap();
      if (w.A.dtype() != atmoe::DType::F32 || w.B.dtype() != atmoe::DType::F32) __builtin_trap();
    }
    (void)a.param_bytes();
    (void)a.sites();
    atmoe::fuzz::report("loaded");
  } catch (const atmoe::InputError& e) {
    atmoe::fuzz::report(e.what());
  }
  return 0;
}
