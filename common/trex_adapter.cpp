#include "common/trex_adapter.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/regex.h"
#include "common/safetensors.h"

namespace atmoe {
namespace fs = std::filesystem;
using json = nlohmann::json;

int64_t TrexAdapter::param_bytes() const {
  int64_t b = 0;
  for (const auto& [k, m] : modules) b += int64_t(m.A.nbytes() + m.B.nbytes() + m.Wr.nbytes() + (m.M.raw() ? m.M.nbytes() : 0));
  return b;
}

static json read_json(const std::string& path) {
  std::ifstream f(path);
  ATMOE_CHECK_INPUT(bool(f), "{}: missing", path);
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    ATMOE_INPUT_ERROR("{}: not valid JSON ({})", path, e.what());
  }
}

TrexAdapter load_trex_adapter(const std::string& dir, const SiteShapes& shapes) {
  TrexAdapter a;
  a.dir = dir;
  ATMOE_CHECK_INPUT(fs::is_directory(dir), "{}: T-REX adapter directory not found", dir);
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string ext_path = (fs::path(dir) / "global_external_config.json").string();
  const std::string st_path = (fs::path(dir) / "adapter_model.safetensors").string();
  json cfg = read_json(cfg_path), ext = read_json(ext_path);
  ATMOE_CHECK_INPUT(cfg.contains("r") && cfg["r"].is_number_integer() && cfg["r"].get<int>() > 0,
                    "{}: field 'r' must be a positive integer", cfg_path);
  const int r = cfg["r"].get<int>();
  a.mode = ext.value("moe_mode", std::string());
  ATMOE_CHECK_INPUT(a.mode == "rank1" || a.mode == "rank1_flex", "{}: moe_mode '{}' (expected rank1 or rank1_flex)", ext_path, a.mode);
  if (a.mode == "rank1") {
    a.r1 = a.r2 = a.E = r;
  } else {
    const json& ra = ext.contains("rank1_flex_rank_allocation") ? ext["rank1_flex_rank_allocation"] : json();
    if (ra.is_array()) {
      ATMOE_CHECK_INPUT(ra.size() == 2 && ra[0].is_number_integer() && ra[1].is_number_integer(),
                        "{}: rank1_flex_rank_allocation must be [r1, r2]", ext_path);
      a.r1 = ra[0].get<int>();
      a.r2 = ra[1].get<int>();
      ATMOE_CHECK_INPUT(a.r1 > 0 && a.r2 > 0 && a.r1 * a.r2 == r,
                        "{}: rank1_flex_rank_allocation [{}, {}] must multiply to r = {}", ext_path, a.r1, a.r2, r);
      a.E = r;
    } else {
      a.r1 = a.r2 = r;  // no allocation: lora_A and lora_B are rank r, E = r·r
      a.E = r * r;
    }
    a.mapper = ext.value("router_mapping", false);
  }
  ATMOE_CHECK_INPUT(ext.value("rank1_flex_topk", -1) <= 0, "{}: rank1_flex_topk > 0 is not supported (nor by the released code)", ext_path);
  std::string abl = ext.contains("ablation") && ext["ablation"].is_string() ? ext["ablation"].get<std::string>() : "";
  ATMOE_CHECK_INPUT(abl.empty() || abl == "None", "{}: ablation '{}' is not supported", ext_path, abl);

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
  for (auto& [ls, f] : found) {
    const auto [layer, s] = ls;
    const int64_t din = shapes.d_in[size_t(s)], dout = shapes.d_out[size_t(s)];
    auto need = [&](const char* part, std::vector<int64_t> shape) {
      ATMOE_CHECK_INPUT(f.key.count(part), "{}: module layers.{}.{} has no '{}' tensor", st_path, layer, site_module(s), part);
      Tensor t = st.get(f.key[part]);
      ATMOE_CHECK_INPUT(t.dtype() == DType::F32 || t.dtype() == DType::F16 || t.dtype() == DType::BF16,
                        "{}: '{}' has dtype {}, expected F32, F16 or BF16", st_path, f.key[part], dtype_name(t.dtype()));
      ATMOE_CHECK_INPUT(t.shape() == shape, "{}: '{}' has shape {}, expected {}", st_path, f.key[part], t.shape_str(),
                        shape_to_string(shape));
      return t.to(DType::F32);
    };
    TrexModule mod;
    mod.A = need("lora_A", {a.r1, din});
    mod.B = need("lora_B", {dout, a.r2});
    mod.Wr = need("router", {a.E, din});
    mod.omega = need("omg", {1, 1}).data<float>()[0];
    mod.gamma = need("binary_main_gate_weight", {1, 1}).data<float>()[0];
    if (a.mapper) {
      ATMOE_CHECK_INPUT(f.key.count("rank1_flex_mapper"), "{}: router_mapping is on but layers.{}.{} has no rank1_flex_mapper",
                        st_path, layer, site_module(s));
      Tensor M = st.get(f.key["rank1_flex_mapper"]);
      ATMOE_CHECK_INPUT(M.ndim() == 2 && M.dim(0) == a.E, "{}: '{}' has shape {}, expected [{}, K]", st_path,
                        f.key["rank1_flex_mapper"], M.shape_str(), a.E);
      mod.M = M.to(DType::F32);
    }
    a.modules[ls] = std::move(mod);
  }
  return a;
}

}  // namespace atmoe
