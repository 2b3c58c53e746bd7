#include "common/bundle.h"

#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace atmoe {
namespace fs = std::filesystem;
using json = nlohmann::json;

std::string bundle_path(const std::string& dir, const std::string& rel, const std::string& manifest,
                        const std::string& field) {
  ATMOE_CHECK_INPUT(!rel.empty(), "{}: {}: empty path", manifest, field);
  fs::path p(rel);
  ATMOE_CHECK_INPUT(p.is_relative() && !p.has_root_path(), "{}: {}: '{}' must be relative to the bundle directory",
                    manifest, field, rel);
  for (const auto& part : p)
    ATMOE_CHECK_INPUT(part != "..", "{}: {}: '{}' leaves the bundle directory", manifest, field, rel);
  return (fs::path(dir) / p.lexically_normal()).string();
}

int Bundle::expert_index(const std::string& name) const {
  for (size_t i = 0; i < experts.size(); ++i)
    if (experts[i].name == name) return int(i);
  return -1;
}

int Bundle::group_index(const std::string& name) const {
  for (size_t i = 0; i < groups.size(); ++i)
    if (groups[i].name == name) return int(i);
  return -1;
}

Bundle load_bundle_manifest(const std::string& dir) {
  Bundle b;
  b.dir = dir;
  b.manifest = (fs::path(dir) / "atmoe.json").string();
  const std::string& m = b.manifest;
  ATMOE_CHECK_INPUT(fs::is_directory(dir), "{}: bundle directory not found", dir);
  ATMOE_CHECK_INPUT(fs::exists(m), "{}: missing bundle manifest", m);
  json j;
  try {
    std::ifstream f(m);
    j = json::parse(f);
  } catch (const json::exception& e) {
    ATMOE_INPUT_ERROR("{}: not valid JSON ({})", m, e.what());
  }
  ATMOE_CHECK_INPUT(j.is_object(), "{}: expected a JSON object", m);
  auto need_str = [&](const json& o, const char* k, const std::string& where) {
    ATMOE_CHECK_INPUT(o.contains(k) && o[k].is_string(), "{}: {}: missing string field '{}'", m, where, k);
    return o[k].get<std::string>();
  };
  ATMOE_CHECK_INPUT(j.value("format", std::string()) == "atmoe-bundle", "{}: field 'format' must be \"atmoe-bundle\"", m);
  ATMOE_CHECK_INPUT(j.contains("version") && j["version"].is_number_integer(), "{}: missing integer field 'version'", m);
  ATMOE_CHECK_INPUT(j["version"].get<int>() == 1, "{}: version {} is not supported (this build reads version 1)", m,
                    j["version"].get<int>());
  b.base_model = bundle_path(dir, need_str(j, "base_model", "bundle"), m, "base_model");
  ATMOE_CHECK_INPUT(fs::exists(b.base_model), "{}: base_model: '{}' not found", m, b.base_model);
  b.method = need_str(j, "method", "bundle");
  ATMOE_CHECK_INPUT(b.method == "at-moe" || b.method == "t-rex", "{}: method '{}' (expected \"at-moe\" or \"t-rex\")", m,
                    b.method);
  if (b.method == "t-rex") {
    ATMOE_CHECK_INPUT(j.contains("t_rex") && j["t_rex"].is_object(), "{}: method t-rex needs an object 't_rex'", m);
    const json& t = j["t_rex"];
    TrexSpec ts;
    ts.adapter_dir = bundle_path(dir, need_str(t, "adapter", "t_rex"), m, "t_rex.adapter");
    ts.centroids_file = bundle_path(dir, need_str(t, "centroids", "t_rex"), m, "t_rex.centroids");
    ATMOE_CHECK_INPUT(t.contains("intuition") && t["intuition"].is_object(), "{}: t_rex.intuition must be an object", m);
    std::string src = need_str(t["intuition"], "source", "t_rex.intuition");
    ATMOE_CHECK_INPUT(src == "embedding" || src == "hidden_state",
                      "{}: t_rex.intuition.source '{}' (expected embedding or hidden_state)", m, src);
    ts.intuition_from_hidden = src == "hidden_state";
    if (ts.intuition_from_hidden) {
      ATMOE_CHECK_INPUT(t["intuition"].contains("layer") && t["intuition"]["layer"].is_number_integer() &&
                            t["intuition"]["layer"].get<int>() >= 0,
                        "{}: t_rex.intuition.layer must be a layer index", m);
      ts.hidden_layer = t["intuition"]["layer"].get<int>();
    }
    b.trex = ts;
    return b;
  }
  ATMOE_CHECK_INPUT(j.contains("groups") && j["groups"].is_array() && !j["groups"].empty(),
                    "{}: 'groups' must be a non-empty list", m);
  std::set<std::string> names, gnames;
  auto read_expert = [&](const json& e, const std::string& where, int group) {
    ATMOE_CHECK_INPUT(e.is_object(), "{}: {}: expected an object", m, where);
    BundleExpert x;
    x.name = need_str(e, "name", where);
    ATMOE_CHECK_INPUT(!x.name.empty(), "{}: {}: empty expert name", m, where);
    ATMOE_CHECK_INPUT(names.insert(x.name).second, "{}: {}: duplicate expert name '{}'", m, where, x.name);
    x.adapter_dir = bundle_path(dir, need_str(e, "adapter", where), m, where + ".adapter");
    x.group = group;
    return x;
  };
  for (size_t gi = 0; gi < j["groups"].size(); ++gi) {
    const json& g = j["groups"][gi];
    std::string where = "groups[" + std::to_string(gi) + "]";
    ATMOE_CHECK_INPUT(g.is_object(), "{}: {}: expected an object", m, where);
    BundleGroup G;
    G.name = need_str(g, "name", where);
    ATMOE_CHECK_INPUT(!G.name.empty(), "{}: {}: empty group name", m, where);
    ATMOE_CHECK_INPUT(gnames.insert(G.name).second, "{}: {}: duplicate group name '{}'", m, where, G.name);
    ATMOE_CHECK_INPUT(g.contains("experts") && g["experts"].is_array() && !g["experts"].empty(),
                      "{}: group '{}' has no experts", m, G.name);
    for (size_t ei = 0; ei < g["experts"].size(); ++ei) {
      G.experts.push_back(int(b.experts.size()));
      b.experts.push_back(read_expert(g["experts"][ei], where + ".experts[" + std::to_string(ei) + "]", int(gi)));
    }
    b.groups.push_back(std::move(G));
  }
  if (j.contains("general_expert") && !j["general_expert"].is_null())
    b.general = read_expert(j["general_expert"], "general_expert", -1);
  if (j.contains("lambda")) {
    ATMOE_CHECK_INPUT(j["lambda"].is_number(), "{}: 'lambda' must be a number", m);
    b.lambda = j["lambda"].get<double>();
    ATMOE_CHECK_INPUT(b.lambda >= 0 && b.lambda <= 1, "{}: 'lambda' = {} must be in [0, 1]", m, b.lambda);
  }
  ATMOE_CHECK_INPUT(j.contains("router") && j["router"].is_object(), "{}: missing object 'router'", m);
  const json& r = j["router"];
  b.router_file = bundle_path(dir, need_str(r, "file", "router"), m, "router.file");
  std::string in = r.value("input", std::string("per_request"));
  ATMOE_CHECK_INPUT(in == "per_request" || in == "per_token", "{}: router.input '{}' (expected per_request or per_token)", m, in);
  b.router_input = in == "per_token" ? RouterInput::PerToken : RouterInput::PerRequest;
  for (auto [k, dst] : {std::pair<const char*, double*>{"tau_group", &b.tau_group}, {"tau_expert", &b.tau_expert}}) {
    if (!r.contains(k)) continue;
    ATMOE_CHECK_INPUT(r[k].is_number() && r[k].get<double>() >= 0, "{}: router.{} must be a number >= 0", m, k);
    *dst = r[k].get<double>();
  }
  return b;
}

}  // namespace atmoe
