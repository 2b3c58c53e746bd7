#include "common/trex_adapter.h"

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

int64_t TrexAdapter::param_bytes() const {
  int64_t b = 0;
  for (const auto& [k, m] : modules) b += int64_t(m.A.nbytes() + m.B.nbytes() + m.Wr.nbytes() + (m.M.raw() ? m.M.nbytes() : 0));
  return b;
}

TrexAdapter load_trex_adapter(const std::string& dir, const SiteShapes& shapes) {
  TrexAdapter a;
  a.dir = dir;
  require_directory(dir, "T-REX adapter directory");
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string ext_path = (fs::path(dir) / "global_external_config.json").string();
  const std::string st_path = (fs::path(dir) / "adapter_model.safetensors").string();
  const json cfg_json = read_json_file(cfg_path, "T-REX adapter config", size_t(16) << 20);
  const json ext_json = read_json_file(ext_path, "T-REX external config", size_t(16) << 20);
  const JsonAt cfg(cfg_json, cfg_path), ext(ext_json, ext_path);
  cfg.object();
  ext.object();
  const int r = int(cfg["r"].integer(1, kMaxLoraRank));
  // The released code's PEFT fork writes a plain LoRA config; settings it does not have
  // would be silently ignored here, so they are refused.
  if (cfg.str_or("peft_type", "LORA") != "LORA") cfg["peft_type"].fail("expected LORA (the T-REX fork's type)");
  for (const char* k : {"use_dora", "fan_in_fan_out", "use_rslora"})
    if (cfg.bool_or(k, false)) cfg[k].fail("is not supported for T-REX adapters");
  if (cfg.has("layers_to_transform")) cfg["layers_to_transform"].fail("is not supported for T-REX adapters");
  if (cfg.str_or("bias", "none") != "none") cfg["bias"].fail("expected \"none\"");
  // target_modules: the module names every adapted module must have (a list; a regex string is not used by the fork).
  std::set<std::string> targets;
  {
    const JsonAt tm = cfg["target_modules"];
    if (!tm.value().is_array() || tm.size() == 0) tm.fail("expected a non-empty list of module names");
    for (size_t i = 0; i < tm.size(); ++i) {
      std::string n = tm.at(i).str();
      n = n.substr(n.rfind('.') == std::string::npos ? 0 : n.rfind('.') + 1);
      Site s;
      if (!parse_site(n, &s))
        tm.at(i).fail(fmt::format("'{}' is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj", n));
      targets.insert(site_module(s));
    }
  }
  a.mode = ext["moe_mode"].str();
  if (a.mode != "rank1" && a.mode != "rank1_flex") ext["moe_mode"].fail(fmt::format("'{}' (expected rank1 or rank1_flex)", a.mode));
  if (a.mode == "rank1") {
    a.r1 = a.r2 = a.E = r;
  } else {
    if (ext.has("rank1_flex_rank_allocation")) {
      const JsonAt ra = ext["rank1_flex_rank_allocation"];
      if (!ra.value().is_array() || ra.size() != 2) ra.fail("expected [r1, r2]");
      a.r1 = int(ra.at(0).integer(1, r));
      a.r2 = int(ra.at(1).integer(1, r));
      if (int64_t(a.r1) * a.r2 != r)
        ra.fail(fmt::format("[{}, {}] must multiply to r = {} ({})", a.r1, a.r2, r, cfg_path));
      a.E = r;
    } else {
      ATMOE_CHECK_INPUT(r <= 1024, "{}: r: {} without rank1_flex_rank_allocation means {} rank-1 experts (at most 1024^2)", cfg_path, r,
                        int64_t(r) * r);
      a.r1 = a.r2 = r;  // no allocation: lora_A and lora_B are rank r, E = r·r
      a.E = r * r;
    }
    a.mapper = ext.bool_or("router_mapping", false);
  }
  if (ext.int_or("rank1_flex_topk", -1, INT32_MIN, INT32_MAX) > 0)
    ext["rank1_flex_topk"].fail("values > 0 are not supported (nor by the released code)");
  const std::string abl = ext.has("ablation") && ext_json["ablation"].is_string() ? ext_json["ablation"].get<std::string>() : "";
  if (!abl.empty() && abl != "None") ext["ablation"].fail(fmt::format("'{}' is not supported", abl));

  SafetensorsFile st(st_path);
  const std::string re =
      R"((?:base_model\.model\.)?model\.layers\.(\d{1,6})\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(lora_A|lora_B|router|omg|binary_main_gate_weight|rank1_flex_mapper)(\.[A-Za-z0-9_.]+)?\.weight)";
  struct Found {
    std::map<std::string, std::string> key;  // part -> tensor name (modules_to_save preferred)
  };
  std::map<std::pair<int, Site>, Found> found;
  for (const auto& k : st.names()) {
    std::vector<std::string> m;
    ATMOE_CHECK_INPUT(regex_full_match(re, k, &m), "{}: unexpected tensor '{}' for a T-REX adapter", st_path, k);
    int layer = std::stoi(m[0]);
    ATMOE_CHECK_INPUT(layer < shapes.n_layers, "{}: '{}': layer {} but the base model has {} layers", st_path, k, layer,
                      shapes.n_layers);
    Site s;
    parse_site(m[1], &s);
    std::string part = m[2], mid = m.size() > 3 ? m[3] : std::string();
    if (mid.find("original_module") != std::string::npos) continue;  // the frozen copy PEFT keeps
    auto& f = found[{layer, s}].key;
    if (!f.count(part) || mid.find("modules_to_save") != std::string::npos) f[part] = k;
  }
  ATMOE_CHECK_INPUT(!found.empty(), "{}: no T-REX modules found", st_path);
  for (const auto& [ls, f] : found)
    ATMOE_CHECK_INPUT(targets.count(site_module(ls.second)), "{}: layers.{}.{} has T-REX tensors but {} does not target {}", st_path,
                      ls.first, site_module(ls.second), cfg_path, site_module(ls.second));
  for (auto& entry : found) {  // no structured binding: clang 14 cannot capture one in the lambda below
    const std::pair<int, Site>& ls = entry.first;
    Found& f = entry.second;
    const int layer = ls.first;
    const Site s = ls.second;
    const int64_t din = shapes.d_in[size_t(s)], dout = shapes.d_out[size_t(s)];
    auto need = [&](const char* part, std::vector<int64_t> shape) {
      ATMOE_CHECK_INPUT(f.key.count(part), "{}: module layers.{}.{} has no '{}' tensor", st_path, layer, site_module(s), part);
      Tensor t = st.get(f.key[part]);
      ATMOE_CHECK_INPUT(t.dtype() == DType::F32 || t.dtype() == DType::F16 || t.dtype() == DType::BF16,
                        "{}: '{}' has dtype {}, expected F32, F16 or BF16", st_path, f.key[part], dtype_name(t.dtype()));
      ATMOE_CHECK_INPUT(t.shape() == shape, "{}: '{}' has shape {}, expected {}", st_path, f.key[part], t.shape_str(),
                        shape_to_string(shape));
      check_finite(t, st_path, f.key[part]);
      return t.to(DType::F32);
    };
    TrexModule mod;
    mod.A = need("lora_A", {a.r1, din});
    mod.B = need("lora_B", {dout, a.r2});
    mod.Wr = need("router", {a.E, din});
    mod.omega = need("omg", {1, 1}).data<float>()[0];
    mod.gamma = need("binary_main_gate_weight", {1, 1}).data<float>()[0];
    // Δy = σ(100γ) · B (Gᵀ u), |G| <= c_p + c_s = 36 without a mapper (cluster scores <= 1):
    // the bound of a LoRA module of scale 36 whose expand sums r1 terms.
    check_lora_bound(36.0, mod.A, mod.B, st_path,
                     fmt::format("layers.{}.{}", layer, site_module(s)));
    if (a.mapper) {
      ATMOE_CHECK_INPUT(f.key.count("rank1_flex_mapper"), "{}: router_mapping is on but layers.{}.{} has no rank1_flex_mapper",
                        st_path, layer, site_module(s));
      Tensor M = st.get(f.key["rank1_flex_mapper"]);
      ATMOE_CHECK_INPUT(M.ndim() == 2 && M.dim(0) == a.E, "{}: '{}' has shape {}, expected [{}, K]", st_path,
                        f.key["rank1_flex_mapper"], M.shape_str(), a.E);
      ATMOE_CHECK_INPUT(M.dtype() == DType::F32 || M.dtype() == DType::F16 || M.dtype() == DType::BF16,
                        "{}: '{}' has dtype {}, expected F32, F16 or BF16", st_path, f.key["rank1_flex_mapper"], dtype_name(M.dtype()));
      check_finite(M, st_path, f.key["rank1_flex_mapper"]);
      mod.M = M.to(DType::F32);
    }
    a.modules[ls] = std::move(mod);
  }
  return a;
}

}  // namespace atmoe
