// PEFT adapter_config.json semantics: target_modules as a list and as a regex,
// rank_pattern / alpha_pattern (PEFT's key rule), use_rslora, fan_in_fan_out (stored
// transposed), layers_to_transform, adapter names in keys, and the refusals.
#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/peft_adapter.h"
#include "common/safetensors.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

SiteShapes shapes() {
  SiteShapes s;
  s.n_layers = 2;
  s.d_in = {16, 16, 16, 16, 16, 16, 24};
  s.d_out = {16, 8, 8, 16, 24, 24, 16};
  return s;
}

struct Mod {
  int layer;
  std::string parent, name;
  int r;
  bool transposed = false;
};

// Writes an adapter dir; lora_A[i][k] = 1000*layer + 10*i + k/100 (recognisable values).
std::string write_adapter(const std::string& name, json cfg, const std::vector<Mod>& mods, const std::string& key_name = "") {
  std::string dir = (fs::temp_directory_path() / ("atmoe_peft_" + name + std::to_string(::getpid()))).string();
  fs::create_directories(dir);
  std::ofstream(dir + "/adapter_config.json") << cfg.dump();
  const SiteShapes sh = shapes();
  std::vector<std::vector<float>> store;
  std::vector<SafetensorsWriteItem> items;
  store.reserve(mods.size() * 2);
  for (const auto& m : mods) {
    Site s;
    parse_site(m.name, &s);
    const int64_t din = sh.d_in[size_t(s)], dout = sh.d_out[size_t(s)];
    std::string p = "base_model.model.model.layers." + std::to_string(m.layer) + "." + m.parent + "." + m.name + ".lora_";
    std::string suffix = key_name.empty() ? ".weight" : "." + key_name + ".weight";
    store.emplace_back(size_t(m.r * din));
    for (int64_t i = 0; i < m.r; ++i)
      for (int64_t k = 0; k < din; ++k) {
        float v = float(1000 * m.layer + 10 * i) + float(k) / 100.f;
        if (m.transposed) store.back()[size_t(k * m.r + i)] = v;
        else store.back()[size_t(i * din + k)] = v;
      }
    items.push_back({p + "A" + suffix, DType::F32,
                     m.transposed ? std::vector<int64_t>{din, m.r} : std::vector<int64_t>{m.r, din}, store.back().data()});
    store.emplace_back(size_t(dout * m.r), 0.5f);
    items.push_back({p + "B" + suffix, DType::F32,
                     m.transposed ? std::vector<int64_t>{m.r, dout} : std::vector<int64_t>{dout, m.r}, store.back().data()});
  }
  write_safetensors(dir + "/adapter_model.safetensors", items);
  return dir;
}

TEST(PeftAdapter, PatternsScalesAndLayouts) {
  json cfg = {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", {"q_proj", "down_proj"}},
              {"rank_pattern", {{"layers.1.self_attn.q_proj", 2}}}, {"alpha_pattern", {{"down_proj", 3}}}};
  auto dir = write_adapter("pat", cfg,
                           {{0, "self_attn", "q_proj", 4}, {1, "self_attn", "q_proj", 2}, {0, "mlp", "down_proj", 4},
                            {1, "mlp", "down_proj", 4}},
                           "default");
  PeftAdapter a = load_peft_adapter(dir, "x", shapes());
  EXPECT_EQ(a.modules.size(), 4u);
  EXPECT_DOUBLE_EQ(a.modules.at({0, Site::Q}).scale, 8.0 / 4);
  EXPECT_DOUBLE_EQ(a.modules.at({1, Site::Q}).scale, 8.0 / 2);  // rank_pattern
  EXPECT_DOUBLE_EQ(a.modules.at({0, Site::Down}).scale, 3.0 / 4);  // alpha_pattern
  EXPECT_EQ(a.modules.at({1, Site::Q}).rank, 2);
  EXPECT_EQ(a.modules.at({0, Site::Q}).A.data<float>()[1 * 16 + 3], 10.f + 0.03f);

  cfg = {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"use_rslora", true},
         {"target_modules", ".*layers\\.1\\.self_attn\\.(q|v)_proj"}, {"fan_in_fan_out", true}};
  dir = write_adapter("rx", cfg, {{1, "self_attn", "q_proj", 4, true}, {1, "self_attn", "v_proj", 4, true}});
  a = load_peft_adapter(dir, "y", shapes());
  EXPECT_DOUBLE_EQ(a.modules.at({1, Site::V}).scale, 8.0 / 2.0);  // alpha / sqrt(r)
  // fan_in_fan_out: stored [d_in, r], loaded as [r, d_in].
  EXPECT_EQ(a.modules.at({1, Site::Q}).A.shape(), (std::vector<int64_t>{4, 16}));
  EXPECT_EQ(a.modules.at({1, Site::Q}).A.data<float>()[2 * 16 + 5], 1000.f + 20.f + 0.05f);

  cfg = {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", {"q_proj"}}, {"layers_to_transform", {1}}};
  dir = write_adapter("ltt", cfg, {{1, "self_attn", "q_proj", 4}});
  EXPECT_EQ(load_peft_adapter(dir, "z", shapes()).modules.size(), 1u);
}

TEST(PeftAdapter, RefusalsNameTheProblem) {
  auto expect_error = [](const std::string& dir, const std::string& needle) {
    try {
      load_peft_adapter(dir, "bad", shapes());
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  json base = {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", {"q_proj"}}};
  std::vector<Mod> q0{{0, "self_attn", "q_proj", 4}, {1, "self_attn", "q_proj", 4}};
  json c = base;
  c["use_dora"] = true;
  expect_error(write_adapter("dora", c, q0), "DoRA");
  c = base;
  c["bias"] = "all";
  expect_error(write_adapter("bias", c, q0), "bias");
  c = base;
  c["modules_to_save"] = {"lm_head"};
  expect_error(write_adapter("mts", c, q0), "modules_to_save");
  c = base;
  c["target_modules"] = {"embed_tokens"};
  expect_error(write_adapter("emb", c, q0), "embeddings");
  c = base;
  c["r"] = 8;  // the tensors say 4
  expect_error(write_adapter("rank", c, q0), "r = 8");
  c = base;
  c["target_modules"] = {"q_proj", "v_proj"};  // v is targeted but absent
  expect_error(write_adapter("missing", c, q0), "v_proj");
  c = base;
  c["target_modules"] = "(unclosed";
  expect_error(write_adapter("badre", c, q0), "regular expression");
  c = base;
  c["peft_type"] = "IA3";
  expect_error(write_adapter("ia3", c, q0), "IA3");
  expect_error(write_adapter("layers", base, {{0, "self_attn", "q_proj", 4}, {1, "self_attn", "q_proj", 4},
                                              {5, "self_attn", "q_proj", 4}}),
               "layer 5");
}

}  // namespace
}  // namespace atmoe::test
