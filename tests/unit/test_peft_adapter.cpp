// PEFT adapter_config.json semantics: target_modules as a list and as a regex,
// rank_pattern / alpha_pattern (PEFT's key rule), use_rslora, fan_in_fan_out (stored
// transposed), layers_to_transform, adapter names in keys, and the refusals.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/dtype.h"
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
  // PEFT features atmoe does not implement are refused when set, not ignored (exclude_modules
  // ["q_proj"] used to be accepted and q_proj adapted anyway); their defaults load.
  for (const auto& [key, val] : std::vector<std::pair<std::string, json>>{{"exclude_modules", {"q_proj"}},
                                                                          {"exclude_modules", "q_.*"},
                                                                          {"layer_replication", {{0, 2}}},
                                                                          {"target_parameters", {"mlp.experts"}},
                                                                          {"trainable_token_indices", {1, 2}},
                                                                          {"use_qalora", true},
                                                                          {"lora_bias", true}}) {
    c = base;
    c[key] = val;
    expect_error(write_adapter("unsup_" + key, c, q0), key);
  }
  c = base;
  for (const char* k : {"exclude_modules", "layer_replication", "target_parameters", "trainable_token_indices"})
    c[k] = nullptr;
  c["use_qalora"] = false;
  c["lora_bias"] = false;
  EXPECT_EQ(load_peft_adapter(write_adapter("defaults", c, q0), "ok", shapes()).modules.size(), 2u);
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

// One q_proj module per layer in `dt`, with element `at` of lora_A (which == 'A') or lora_B
// set to `value`.
std::string write_poisoned(const std::string& name, DType dt, char which, float value, int64_t at, json cfg) {
  std::string dir = (fs::temp_directory_path() / ("atmoe_peft_" + name + std::to_string(::getpid()))).string();
  fs::create_directories(dir);
  std::ofstream(dir + "/adapter_config.json") << cfg.dump();
  std::vector<std::vector<uint8_t>> store;
  std::vector<SafetensorsWriteItem> items;
  store.reserve(4);
  for (int l = 0; l < 2; ++l)
    for (char m : {'A', 'B'}) {
      std::vector<int64_t> shape = m == 'A' ? std::vector<int64_t>{4, 16} : std::vector<int64_t>{16, 4};
      std::vector<float> f(64, m == 'A' ? 0.25f : 0.5f);
      if (l == 1 && m == which) f[size_t(at)] = value;
      store.emplace_back(64 * dtype_size(dt));
      for (size_t i = 0; i < 64; ++i) {
        if (dt == DType::F32) std::memcpy(store.back().data() + 4 * i, &f[i], 4);
        else {
          uint16_t h = dt == DType::F16 ? f32_to_f16(f[i]) : f32_to_bf16(f[i]);
          std::memcpy(store.back().data() + 2 * i, &h, 2);
        }
      }
      items.push_back({"base_model.model.model.layers." + std::to_string(l) + ".self_attn.q_proj.lora_" + std::string(1, m) +
                           ".weight", dt, shape, store.back().data()});
    }
  write_safetensors(dir + "/adapter_model.safetensors", items);
  return dir;
}

std::string load_error(const std::string& dir) {
  try {
    load_peft_adapter(dir, "bad", shapes());
  } catch (const InputError& e) {
    return e.what();
  }
  return "(accepted)";
}

TEST(PeftAdapter, NonFiniteWeightsAreRefusedNamingFileAndTensor) {
  const json cfg = {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", {"q_proj"}}};
  std::mt19937_64 rng(test_seed() + 31);
  int n = 0;
  for (DType dt : {DType::F32, DType::F16, DType::BF16})
    for (char which : {'A', 'B'})
      for (float v : {NAN, INFINITY, -INFINITY}) {
        const int64_t at = int64_t(rng() % 64);
        std::string e = load_error(write_poisoned("nf" + std::to_string(n++), dt, which, v, at, cfg));
        EXPECT_NE(e.find("adapter_model.safetensors"), std::string::npos) << e;
        EXPECT_NE(e.find("layers.1.self_attn.q_proj.lora_" + std::string(1, which)), std::string::npos) << e;
        EXPECT_NE(e.find(std::isnan(v) ? "NaN" : (v > 0 ? "+Inf" : "-Inf")), std::string::npos) << e;
        EXPECT_NE(e.find("index " + std::to_string(at)), std::string::npos) << e;
      }
  // Finite values whose product overflows f32, and scales that do.
  std::string e = load_error(write_poisoned("big", DType::F32, 'B', 3e38f, 5, cfg));
  EXPECT_NE(e.find("overflows f32"), std::string::npos) << e;
  EXPECT_NE(e.find("model.layers.1.self_attn.q_proj"), std::string::npos) << e;
  json c = cfg;
  c["lora_alpha"] = 1e300;
  EXPECT_NE(load_error(write_poisoned("alpha", DType::F32, 'B', 0.5f, 0, c)).find("lora_alpha"), std::string::npos);
  c = cfg;
  c["lora_alpha"] = 1e29;  // inside the field's range, but s · r · max|B| · max|A| · d_in overflows
  EXPECT_NE(load_error(write_poisoned("alpha2", DType::F32, 'B', 1e10f, 0, c)).find("overflows f32"), std::string::npos);
  // lora_alpha 1e29 on ordinary weights: the product is finite in f32, its square is not (the
  // residual stream went NaN a layer later and generate printed garbage with exit 0).
  EXPECT_NE(load_error(write_poisoned("alpha3", DType::F32, 'B', 0.5f, 0, c)).find("overflows f32"), std::string::npos);
  // The same files with ordinary values load.
  EXPECT_EQ(load_peft_adapter(write_poisoned("ok", DType::BF16, 'B', 0.75f, 3, cfg), "ok", shapes()).modules.size(), 2u);
}

TEST(PeftAdapter, FieldsAreTypedAndRangeCheckedBeforeNarrowing) {
  const json cfg = {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", {"q_proj"}}};
  auto err = [&](const char* field, json value) {
    json c = cfg;
    c[field] = value;
    return load_error(write_poisoned(std::string("ty_") + field, DType::F32, 'B', 0.5f, 0, c));
  };
  EXPECT_NE(err("r", "4").find("r: expected an integer in 1..4096, got the string \"4\""), std::string::npos) << err("r", "4");
  EXPECT_NE(err("r", 1e30).find("r: expected an integer"), std::string::npos);
  EXPECT_NE(err("r", 4294967300ull).find("got 4294967300"), std::string::npos);  // would narrow to 4
  EXPECT_NE(err("r", -4).find("got -4"), std::string::npos);
  EXPECT_NE(err("lora_alpha", "16").find("lora_alpha: expected a number"), std::string::npos);
  EXPECT_NE(err("use_rslora", "yes").find("use_rslora: expected true or false"), std::string::npos);
  EXPECT_NE(err("target_modules", 5).find("target_modules: expected a list"), std::string::npos);
  EXPECT_NE(err("layers_to_transform", json::array({4294967296ull})).find("layers_to_transform[0]"), std::string::npos);
  EXPECT_NE(err("layers_to_transform", json::array({2})).find("expected an integer in 0..1"), std::string::npos);
  EXPECT_NE(err("rank_pattern", {{"q_proj", 1e30}}).find("rank_pattern.q_proj"), std::string::npos);
  EXPECT_NE(err("alpha_pattern", {{"q_proj", "x"}}).find("alpha_pattern.q_proj"), std::string::npos);
  // Keys PEFT writes that atmoe does not read stay accepted.
  json c = cfg;
  c["task_type"] = "CAUSAL_LM";
  c["lora_dropout"] = 0.05;
  c["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct";
  EXPECT_EQ(load_peft_adapter(write_poisoned("extra", DType::F32, 'B', 0.5f, 0, c), "ok", shapes()).modules.size(), 2u);
}

}  // namespace
}  // namespace atmoe::test
