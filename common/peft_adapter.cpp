#include "common/peft_adapter.h"

#include <cmath>
#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/files.h"
#include "common/json_reader.h"
#include "common/regex.h"
#include "common/safetensors.h"
#include "common/tensor_check.h"

namespace atmoe {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
const char* kSiteNames[kNumSites] = {"q", "k", "v", "o", "gate", "up", "down"};
const char* kSiteModules[kNumSites] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
const char* kSiteParents[kNumSites] = {"self_attn", "self_attn", "self_attn", "self_attn", "mlp", "mlp", "mlp"};

std::string module_path(int layer, Site s) {
  return "model.layers." + std::to_string(layer) + "." + kSiteParents[int(s)] + "." + kSiteModules[int(s)];
}

// PEFT's pattern rule (tuners_utils.get_pattern_key): the module name ends with `key`
// after a dot, or equals it.
bool pattern_matches(const std::string& key, const std::string& module, const std::string& file) {
  return regex_full_match("(.*\\.)?(" + key + ")", module, nullptr, file + ": rank_pattern/alpha_pattern key");
}
}  // namespace

const char* site_name(Site s) { return kSiteNames[int(s)]; }
const char* site_module(Site s) { return kSiteModules[int(s)]; }
const char* site_input_name(SiteInput in) {
  constexpr const char* n[] = {"attn_in", "attn_out", "mlp_in", "mlp_act"};
  return n[int(in)];
}
bool parse_site(const std::string& s, Site* out) {
  for (int i = 0; i < kNumSites; ++i)
    if (s == kSiteNames[i] || s == kSiteModules[i]) {
      *out = Site(i);
      return true;
    }
  return false;
}

double lora_scale(double alpha, int r, bool rslora) { return rslora ? alpha / std::sqrt(double(r)) : alpha / double(r); }

int64_t PeftAdapter::param_bytes() const {
  int64_t b = 0;
  for (const auto& [k, w] : modules) b += int64_t(w.A.nbytes() + w.B.nbytes());
  return b;
}

std::vector<Site> PeftAdapter::sites() const {
  std::set<int> s;
  for (const auto& [k, w] : modules) s.insert(int(k.second));
  std::vector<Site> r;
  for (int i : s) r.push_back(Site(i));
  return r;
}

PeftAdapter load_peft_adapter(const std::string& dir, const std::string& name, const SiteShapes& shapes) {
  PeftAdapter a;
  a.name = name;
  a.dir = dir;
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string st_path = (fs::path(dir) / "adapter_model.safetensors").string();
  require_directory(dir, fmt::format("adapter directory of expert '{}'", name));
  ATMOE_CHECK_INPUT(path_exists(cfg_path, "adapter config"), "{}: missing adapter_config.json (expert '{}')", dir, name);
  ATMOE_CHECK_INPUT(path_exists(st_path, "adapter weights"), "{}: missing adapter_model.safetensors (expert '{}')", dir, name);
  const json c = read_json_file(cfg_path, "adapter config", size_t(16) << 20);
  const JsonAt cfg(c, cfg_path);
  cfg.object();
  std::string pt = cfg.str_or("peft_type", "LORA");
  if (pt != "LORA") cfg["peft_type"].fail(fmt::format("'{}' is not supported (expected LORA)", pt));
  if (cfg.bool_or("use_dora", false)) cfg["use_dora"].fail("DoRA adapters are not supported");
  std::string bias = cfg.str_or("bias", "none");
  if (bias != "none") cfg["bias"].fail(fmt::format("'{}': trained biases are not supported (expected \"none\")", bias));
  if (cfg.has("modules_to_save") && !(c["modules_to_save"].is_array() && c["modules_to_save"].empty()))
    cfg["modules_to_save"].fail("fully trained modules are not supported");
  // PEFT features that change what the adapter computes and that atmoe does not implement:
  // refused when set (PEFT writes them null, false or empty by default), never ignored.
  for (const char* k : {"exclude_modules", "layer_replication", "target_parameters", "trainable_token_indices"})
    if (cfg.has(k) && !((c[k].is_array() || c[k].is_object()) && c[k].empty()))
      cfg[k].fail("is not supported (atmoe adapts the modules target_modules names, as they are)");
  for (const char* k : {"use_qalora", "lora_bias"})
    if (cfg.bool_or(k, false)) cfg[k].fail("is not supported");
  a.default_rank = int(cfg["r"].integer(1, kMaxLoraRank));
  a.default_alpha = cfg["lora_alpha"].number(-1e30, 1e30);
  a.rslora = cfg.bool_or("use_rslora", false);
  const bool fifo = cfg.bool_or("fan_in_fan_out", false);
  std::map<std::string, int> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  if (cfg.has("rank_pattern")) {
    const JsonAt rp = cfg["rank_pattern"];
    for (auto it = rp.object().begin(); it != c["rank_pattern"].end(); ++it)
      rank_pattern[it.key()] = int(rp[it.key()].integer(1, kMaxLoraRank));
  }
  if (cfg.has("alpha_pattern")) {
    const JsonAt ap = cfg["alpha_pattern"];
    for (auto it = ap.object().begin(); it != c["alpha_pattern"].end(); ++it) alpha_pattern[it.key()] = ap[it.key()].number(-1e30, 1e30);
  }
  std::set<int> layers;
  if (cfg.has("layers_to_transform")) {
    const JsonAt l = cfg["layers_to_transform"];
    if (l.value().is_array()) {
      for (size_t i = 0; i < l.size(); ++i) layers.insert(int(l.at(i).integer(0, shapes.n_layers - 1)));
    } else {
      layers.insert(int(l.integer(0, shapes.n_layers - 1)));
    }
  }
  // target_modules: list of names or a regex over the full module name.
  const json& tm = cfg["target_modules"].value();
  auto targeted = [&](int layer, Site s) {
    if (!layers.empty() && !layers.count(layer)) return false;
    const std::string mod = module_path(layer, s);
    if (tm.is_string()) return regex_full_match(tm.get<std::string>(), mod, nullptr, cfg_path + ": target_modules");
    for (const auto& t : tm) {
      std::string n = t.get<std::string>();
      if (mod == n || (mod.size() > n.size() && mod.compare(mod.size() - n.size() - 1, n.size() + 1, "." + n) == 0))
        return true;
    }
    return false;
  };
  if (tm.is_array()) {
    for (const auto& t : tm) {
      ATMOE_CHECK_INPUT(t.is_string(), "{}: target_modules must hold strings", cfg_path);
      std::string n = t.get<std::string>();
      ATMOE_CHECK_INPUT(n != "embed_tokens" && n != "lm_head",
                        "{}: target_modules '{}': LoRA on embeddings or lm_head is not supported", cfg_path, n);
      Site s;
      std::string last = n.substr(n.rfind('.') == std::string::npos ? 0 : n.rfind('.') + 1);
      ATMOE_CHECK_INPUT(parse_site(last, &s), "{}: target_modules '{}' is not one of q_proj, k_proj, v_proj, o_proj, "
                        "gate_proj, up_proj, down_proj", cfg_path, n);
    }
  } else {
    if (!tm.is_string()) cfg["target_modules"].fail("expected a list of module names or a regex string, got " + json_describe(tm));
  }

  SafetensorsFile st(st_path);
  // Index the tensors by (layer, site, A|B); anything else is an error naming the key.
  std::map<std::tuple<int, int, char>, std::string> keys;
  const std::string key_re =
      R"((?:base_model\.model\.)?model\.layers\.(\d{1,6})\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)(?:\.[^.]+)?\.weight)";
  for (const auto& k : st.names()) {
    std::vector<std::string> m;
    if (!regex_full_match(key_re, k, &m)) {
      ATMOE_CHECK_INPUT(k.find("lora_magnitude_vector") == std::string::npos, "{}: '{}': DoRA adapters are not supported", st_path, k);
      ATMOE_CHECK_INPUT(k.find("embed_tokens") == std::string::npos && k.find("lm_head") == std::string::npos &&
                            k.find("lora_embedding") == std::string::npos,
                        "{}: '{}': LoRA on embeddings or lm_head is not supported", st_path, k);
      ATMOE_INPUT_ERROR("{}: unexpected tensor '{}' (expected ...layers.N.self_attn|mlp.X_proj.lora_A|lora_B.weight)", st_path, k);
    }
    int layer = std::stoi(m[0]);
    ATMOE_CHECK_INPUT(layer < shapes.n_layers, "{}: '{}': layer {} but the base model has {} layers", st_path, k, layer, shapes.n_layers);
    Site s;
    parse_site(m[2], &s);
    auto key = std::make_tuple(layer, int(s), m[3][0]);
    ATMOE_CHECK_INPUT(!keys.count(key), "{}: '{}' duplicates '{}'", st_path, k, keys[key]);
    keys[key] = k;
  }
  for (int l = 0; l < shapes.n_layers; ++l)
    for (int si = 0; si < kNumSites; ++si) {
      Site s = Site(si);
      bool has_a = keys.count({l, si, 'A'}), has_b = keys.count({l, si, 'B'});
      bool want = targeted(l, s);
      if (!has_a && !has_b) {
        ATMOE_CHECK_INPUT(!want, "{}: no lora_A/lora_B for targeted module {}", st_path, module_path(l, s));
        continue;
      }
      ATMOE_CHECK_INPUT(has_a && has_b, "{}: {} has lora_{} but not lora_{}", st_path, module_path(l, s), has_a ? "A" : "B",
                        has_a ? "B" : "A");
      ATMOE_CHECK_INPUT(want, "{}: {} has LoRA weights but adapter_config.json does not target it", st_path, module_path(l, s));
      const std::string ka = keys[{l, si, 'A'}], kb = keys[{l, si, 'B'}];
      Tensor A = st.get(ka), B = st.get(kb);
      ATMOE_CHECK_INPUT(A.dtype() == DType::F32 || A.dtype() == DType::F16 || A.dtype() == DType::BF16,
                        "{}: '{}' has dtype {}, expected F32, F16 or BF16", st_path, ka, dtype_name(A.dtype()));
      ATMOE_CHECK_INPUT(B.dtype() == DType::F32 || B.dtype() == DType::F16 || B.dtype() == DType::BF16,
                        "{}: '{}' has dtype {}, expected F32, F16 or BF16", st_path, kb, dtype_name(B.dtype()));
      ATMOE_CHECK_INPUT(A.ndim() == 2 && B.ndim() == 2, "{}: '{}'/'{}' must be matrices", st_path, ka, kb);
      check_finite(A, st_path, ka);
      check_finite(B, st_path, kb);
      A = A.to(DType::F32);
      B = B.to(DType::F32);
      if (fifo) {  // stored as [d_in, r] and [r, d_out]: transpose to the Linear layout
        auto tr = [](const Tensor& t) {
          Tensor o = Tensor::empty(DType::F32, {t.dim(1), t.dim(0)});
          for (int64_t i = 0; i < t.dim(0); ++i)
            for (int64_t j = 0; j < t.dim(1); ++j) o.data<float>()[j * t.dim(0) + i] = t.data<float>()[i * t.dim(1) + j];
          return o;
        };
        A = tr(A);
        B = tr(B);
      }
      const int64_t r = A.dim(0), din = shapes.d_in[size_t(si)], dout = shapes.d_out[size_t(si)];
      ATMOE_CHECK_INPUT(A.dim(1) == din, "{}: '{}' has shape {}, expected [r, {}] for the base model's {}", st_path, ka,
                        A.shape_str(), din, site_module(s));
      ATMOE_CHECK_INPUT(B.dim(0) == dout && B.dim(1) == r, "{}: '{}' has shape {}, expected [{}, {}]", st_path, kb,
                        B.shape_str(), dout, r);
      const std::string mod = module_path(l, s);
      int want_r = a.default_rank;
      for (auto& [pat, rv] : rank_pattern)
        if (pattern_matches(pat, mod, cfg_path)) {
          want_r = rv;
          break;
        }
      double alpha = a.default_alpha;
      for (auto& [pat, av] : alpha_pattern)
        if (pattern_matches(pat, mod, cfg_path)) {
          alpha = av;
          break;
        }
      ATMOE_CHECK_INPUT(r == want_r, "{}: '{}' has rank {} but adapter_config.json says r = {} for {}", st_path, ka, r,
                        want_r, mod);
      LoraWeights w;
      w.rank = int(r);
      w.scale = lora_scale(alpha, int(r), a.rslora);
      check_lora_bound(w.scale, A, B, st_path, mod);
      w.A = A;
      w.B = B;
      a.modules[{l, s}] = std::move(w);
    }
  ATMOE_CHECK_INPUT(!a.modules.empty(), "{}: the adapter adapts no module", st_path);
  return a;
}

}  // namespace atmoe
