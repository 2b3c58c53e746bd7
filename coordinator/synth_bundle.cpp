#include "coordinator/synth_bundle.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "coordinator/experts.h"
#include "coordinator/model.h"

namespace atmoe {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
const char* kGroupNames[] = {"medicine", "law", "code", "math", "support", "finance", "science", "travel"};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> r;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ','))
    if (!x.empty()) r.push_back(x);
  return r;
}

void write_adapter(const std::string& dir, const ModelConfig& c, const std::vector<Site>& sites, int r, double alpha,
                   std::mt19937_64& rng, double b_std) {
  fs::create_directories(dir);
  std::vector<std::string> mods;
  for (Site s : sites) mods.push_back(site_module(s));
  json cfg = {{"peft_type", "LORA"},       {"task_type", "CAUSAL_LM"}, {"r", r},        {"lora_alpha", alpha},
              {"lora_dropout", 0.0},       {"target_modules", mods},   {"bias", "none"}, {"use_rslora", false},
              {"fan_in_fan_out", false},   {"use_dora", false},        {"inference_mode", true},
              {"base_model_name_or_path", "atmoe-synth"}};
  write_file((fs::path(dir) / "adapter_config.json").string(), cfg.dump(1), "synth output");
  const SiteShapes sh = site_shapes(c);
  std::vector<std::vector<float>> store;
  std::vector<SafetensorsWriteItem> items;
  store.reserve(size_t(c.n_layers) * sites.size() * 2);
  for (int l = 0; l < c.n_layers; ++l)
    for (Site s : sites) {
      const int64_t din = sh.d_in[size_t(s)], dout = sh.d_out[size_t(s)];
      std::string p = "base_model.model.model.layers." + std::to_string(l) + "." +
                      (int(s) <= int(Site::O) ? "self_attn." : "mlp.") + site_module(s);
      std::normal_distribution<float> na(0.f, float(1.0 / std::sqrt(double(din)))), nb(0.f, float(b_std));
      store.emplace_back(size_t(r * din));
      for (auto& v : store.back()) v = na(rng);
      items.push_back({p + ".lora_A.weight", DType::F32, {r, din}, store.back().data()});
      store.emplace_back(size_t(dout * r));
      for (auto& v : store.back()) v = nb(rng);
      items.push_back({p + ".lora_B.weight", DType::F32, {dout, r}, store.back().data()});
    }
  write_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), items, {{"format", "pt"}});
}
}  // namespace

static void synth_trex(const SynthBundleOptions& o, const ModelConfig& c, const std::vector<Site>& sites,
                       const std::vector<int>& ranks, const std::string& link) {
  ATMOE_CHECK_INPUT(o.trex_mode == "rank1" || o.trex_mode == "rank1_flex", "--trex-mode '{}': expected rank1 or rank1_flex",
                    o.trex_mode);
  const bool flex = o.trex_mode == "rank1_flex";
  ATMOE_CHECK_INPUT(ranks.size() <= (flex ? 2u : 1u), "--rank '{}': t-rex {} takes {}", o.ranks, o.trex_mode,
                    flex ? "r or r1,r2" : "one rank r");
  ATMOE_CHECK_INPUT(o.intuition != "embedding" || (o.embedding_dim >= 1 && o.embedding_dim <= 65536),
                    "--embedding-dim {}: must be in 1..65536", o.embedding_dim);
  ATMOE_CHECK_INPUT(o.intuition_layer >= -1 && o.intuition_layer < c.n_layers, "--intuition-layer {}: the base has layers 0..{}",
                    o.intuition_layer, c.n_layers - 1);
  const int r1 = ranks[0], r2 = flex ? (ranks.size() > 1 ? ranks[1] : ranks[0]) : ranks[0];
  const int E = flex ? r1 * r2 : r1, K = o.router_mapping ? 32 : E;
  ATMOE_CHECK_INPUT(o.intuition == "hidden_state" || o.intuition == "embedding",
                    "--intuition '{}': expected hidden_state or embedding", o.intuition);
  const int64_t de = o.intuition == "hidden_state" ? c.hidden : o.embedding_dim;
  const std::string dir = (fs::path(o.out) / "trex").string();
  fs::create_directories(dir);
  std::vector<std::string> mods;
  for (Site s : sites) mods.push_back(site_module(s));
  json cfg = {{"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"r", E}, {"lora_alpha", 2 * E}, {"lora_dropout", 0.0},
              {"target_modules", mods}, {"bias", "none"}, {"fan_in_fan_out", false}, {"inference_mode", true},
              {"modules_to_save", nullptr}};
  write_file((fs::path(dir) / "adapter_config.json").string(), cfg.dump(1), "synth output");
  json ext = {{"moe_mode", o.trex_mode}, {"rank1_flex_topk", -1}, {"router_mapping", o.router_mapping},
              {"ablation", nullptr}, {"rank1_flex_rank_allocation", flex ? json::array({r1, r2}) : json(nullptr)}};
  write_file((fs::path(dir) / "global_external_config.json").string(), ext.dump(1), "synth output");
  std::mt19937_64 rng(o.seed);
  const SiteShapes sh = site_shapes(c);
  std::vector<std::vector<float>> store;
  std::vector<SafetensorsWriteItem> items;
  store.reserve(size_t(c.n_layers) * sites.size() * 6 + 1);
  auto add = [&](const std::string& n, std::vector<int64_t> shape, double std, double mean = 0) {
    size_t cnt = 1;
    for (auto x : shape) cnt *= size_t(x);
    std::normal_distribution<double> nd(mean, std);
    store.emplace_back(cnt);
    for (auto& v : store.back()) v = float(nd(rng));
    items.push_back({n, DType::F32, shape, store.back().data()});
  };
  for (int l = 0; l < c.n_layers; ++l)
    for (Site s : sites) {
      const int64_t din = sh.d_in[size_t(s)], dout = sh.d_out[size_t(s)];
      std::string p = "base_model.model.model.layers." + std::to_string(l) + "." +
                      (int(s) <= int(Site::O) ? "self_attn." : "mlp.") + site_module(s);
      add(p + ".lora_A.weight", {r1, din}, 1.0 / std::sqrt(double(din)));
      add(p + ".lora_B.weight", {dout, r2}, o.b_std);
      add(p + ".router.weight", {E, din}, o.router_gain / std::sqrt(double(din)));
      add(p + ".omg.modules_to_save.default.weight", {1, 1}, 0.01);
      add(p + ".binary_main_gate_weight.modules_to_save.default.weight", {1, 1}, 0.005, 0.02);
      if (o.router_mapping) add(p + ".rank1_flex_mapper.weight", {E, K}, 1.0 / std::sqrt(double(K)));
    }
  write_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), items, {{"format", "pt"}});
  std::vector<float> cen(static_cast<size_t>(K * de));
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int k = 0; k < K; ++k) {
    double n2 = 0;
    for (int64_t i = 0; i < de; ++i) n2 += double(cen[size_t(k * de + i)] = nd(rng)) * cen[size_t(k * de + i)];
    for (int64_t i = 0; i < de; ++i) cen[size_t(k * de + i)] = float(cen[size_t(k * de + i)] / std::sqrt(n2));
  }
  write_safetensors((fs::path(o.out) / "centroids.safetensors").string(), {{"centroids", DType::F32, {K, de}, cen.data()}},
                    {{"atmoe_fit", "synth-bundle"}});
  json intu = {{"source", o.intuition}};
  if (o.intuition == "hidden_state") intu["layer"] = o.intuition_layer >= 0 ? o.intuition_layer : c.n_layers / 4;
  json man = {{"format", "atmoe-bundle"}, {"version", 1}, {"base_model", link}, {"method", "t-rex"},
              {"t_rex", {{"adapter", "trex"}, {"centroids", "centroids.safetensors"}, {"intuition", intu}}}};
  write_file((fs::path(o.out) / "atmoe.json").string(), man.dump(1) + "\n", "synth output");
}

void synth_bundle(const SynthBundleOptions& o) {
  ATMOE_CHECK_INPUT(o.method == "at-moe" || o.method == "t-rex", "synth-bundle --method '{}': expected at-moe or t-rex", o.method);
  ATMOE_CHECK_INPUT(o.groups >= 1 && o.groups <= 4096 && o.per_group >= 1 && o.per_group <= 1024 &&
                        int64_t(o.groups) * o.per_group <= 4096,
                    "synth-bundle: --groups (1..4096) x --experts-per-group (1..1024) must give at most 4096 experts");
  ATMOE_CHECK_INPUT(o.input == "per_request" || o.input == "per_token", "--router-input '{}': expected per_request or per_token", o.input);
  ATMOE_CHECK_INPUT(std::isfinite(o.b_std) && o.b_std >= 0 && o.b_std <= 1e3, "--b-std {}: must be in [0, 1000]", o.b_std);
  ATMOE_CHECK_INPUT(std::isfinite(o.router_gain) && o.router_gain >= 0 && o.router_gain <= 1e3, "--router-gain {}: must be in [0, 1000]",
                    o.router_gain);
  std::vector<Site> sites;
  for (const auto& t : split(o.targets)) {
    Site s;
    ATMOE_CHECK_INPUT(parse_site(t, &s), "--targets '{}': '{}' is not one of q,k,v,o,gate,up,down", o.targets, t);
    sites.push_back(s);
  }
  ATMOE_CHECK_INPUT(!sites.empty(), "--targets: at least one module");
  std::vector<int> ranks;
  {
    // "8" or "4,8,16": integers in 1..1024, no empty items.
    std::stringstream ss(o.ranks);
    std::string r;
    bool ok = !o.ranks.empty() && o.ranks.back() != ',';
    while (ok && std::getline(ss, r, ',')) {
      ok = !r.empty() && r.size() <= 4 && r.find_first_not_of("0123456789") == std::string::npos;
      if (ok) ranks.push_back(std::atoi(r.c_str()));
      ok = ok && ranks.back() >= 1 && ranks.back() <= 1024;
    }
    ATMOE_CHECK_INPUT(ok, "--rank '{}': expected integers in 1..1024 separated by commas", o.ranks);
  }
  ATMOE_CHECK_INPUT(!ranks.empty(), "--rank: at least one rank");
  auto model = Model::load(o.base, DType::F32);  // validates the base and gives its shapes
  const ModelConfig& c = model->config();
  fs::create_directories(o.out);
  std::string abs = fs::absolute(o.base).lexically_normal().string();
  std::string link = path_kind(o.base, "--base") == PathKind::Directory ? "base" : "base.gguf";
  fs::remove(fs::path(o.out) / link);
  fs::create_symlink(abs, fs::path(o.out) / link);
  if (o.method == "t-rex") {
    synth_trex(o, c, sites, ranks, link);
    return;
  }
  std::mt19937_64 rng(o.seed);
  json groups = json::array();
  int e = 0;
  for (int g = 0; g < o.groups; ++g) {
    std::string gname = g < 8 ? kGroupNames[g] : "group" + std::to_string(g);
    json ex = json::array();
    for (int i = 0; i < o.per_group; ++i, ++e) {
      std::string name = gname + "-" + std::to_string(i);
      int r = ranks[size_t(e) % ranks.size()];
      write_adapter((fs::path(o.out) / "experts" / name).string(), c, sites, r, 2.0 * r, rng, o.b_std);
      ex.push_back({{"name", name}, {"adapter", "experts/" + name}});
    }
    groups.push_back({{"name", gname}, {"experts", ex}});
  }
  json man = {{"format", "atmoe-bundle"}, {"version", 1}, {"base_model", link}, {"method", "at-moe"}, {"groups", groups},
              {"router", {{"file", "router.safetensors"}, {"input", o.input}, {"tau_group", 1.0}, {"tau_expert", 1.0}}}};
  if (o.general) {
    write_adapter((fs::path(o.out) / "experts" / "general").string(), c, sites, ranks[0], 2.0 * ranks[0], rng, o.b_std);
    man["general_expert"] = {{"name", "general"}, {"adapter", "experts/general"}};
    man["lambda"] = 0.8;
  }
  // Routers: W ~ N(0, gain^2 / d), biases ~ N(0, 0.25).
  const int64_t d = c.hidden, E = int64_t(o.groups) * o.per_group;
  std::normal_distribution<float> nw(0.f, float(o.router_gain / std::sqrt(double(d)))), nbias(0.f, 0.5f);
  std::vector<std::vector<float>> store;
  std::vector<SafetensorsWriteItem> items;
  store.reserve(size_t(c.n_layers) * 4);
  for (int l = 0; l < c.n_layers; ++l) {
    std::string p = "layers." + std::to_string(l) + ".";
    auto add = [&](const std::string& n, std::vector<int64_t> shape, std::normal_distribution<float>& dist) {
      size_t cnt = 1;
      for (auto x : shape) cnt *= size_t(x);
      store.emplace_back(cnt);
      for (auto& v : store.back()) v = dist(rng);
      items.push_back({n, DType::F32, shape, store.back().data()});
    };
    add(p + "group_gate.weight", {o.groups, d}, nw);
    add(p + "group_gate.bias", {o.groups}, nbias);
    add(p + "expert_gate.weight", {E, d}, nw);
    add(p + "expert_gate.bias", {E}, nbias);
  }
  write_safetensors((fs::path(o.out) / "router.safetensors").string(), items, {{"atmoe_fit", "synth-bundle"}});
  write_file((fs::path(o.out) / "atmoe.json").string(), man.dump(1) + "\n", "synth output");
}

}  // namespace atmoe
