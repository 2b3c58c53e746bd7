#include "common/bundle.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "common/error.h"
#include "common/files.h"
#include "common/json_reader.h"
#include "common/utf8.h"

namespace atmoe {
namespace fs = std::filesystem;
using json = nlohmann::json;

std::string bundle_path(const std::string& dir, const std::string& rel, const std::string& manifest,
                        const std::string& field) {
  ATMOE_CHECK_INPUT(!rel.empty(), "{}: {}: empty path", manifest, field);
  ATMOE_CHECK_INPUT(rel.find('\0') == std::string::npos, "{}: {}: a path with a NUL byte", manifest, field);
  fs::path p(rel);
  ATMOE_CHECK_INPUT(p.is_relative() && !p.has_root_path(), "{}: {}: '{}' must be relative to the bundle directory",
                    manifest, field, rel);
  for (const auto& part : p)
    ATMOE_CHECK_INPUT(part != "..", "{}: {}: '{}' leaves the bundle directory", manifest, field, rel);
  fs::path q = p.lexically_normal();
  if (!q.has_filename() && q.has_parent_path()) q = q.parent_path();  // "experts/a/" -> "experts/a"
  return (fs::path(dir) / q).string();
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

// Names are used in flag lists ("--pin g=0.7,h=0.3", "--mask a,b"): no ',' or '=', no
// leading or trailing space, no control characters.
static void check_name(const JsonAt& at, const std::string& n) {
  if (n.empty()) at.fail("empty name");
  if (n.size() > 128) at.fail("a name of more than 128 bytes");
  for (size_t i = 0; i < n.size(); ++i)
    if (n[i] == ',' || n[i] == '=' || utf8_control_len(n, i))
      at.fail(fmt::format("name \"{}\" must not contain ',', '=' or control characters", n));
  if (utf8_sanitize(n) != n) at.fail("a name must be valid UTF-8");
  if (n.front() == ' ' || n.back() == ' ') at.fail(fmt::format("name \"{}\" has leading or trailing spaces", n));
}

Bundle load_bundle_manifest(const std::string& dir) {
  Bundle b;
  b.dir = dir;
  b.manifest = (fs::path(dir) / "atmoe.json").string();
  const std::string& m = b.manifest;
  require_directory(dir, "bundle directory");
  ATMOE_CHECK_INPUT(path_exists(m, "bundle manifest"), "{}: missing bundle manifest", m);
  const json j = read_json_file(m, "bundle manifest", size_t(16) << 20);
  const JsonAt root(j, m);
  root.object();
  if (root["format"].str() != "atmoe-bundle") root["format"].fail("expected \"atmoe-bundle\"");
  const int64_t version = root["version"].integer(0, INT32_MAX);
  if (version != 1) root["version"].fail(fmt::format("version {} is not supported (this build reads version 1)", version));
  b.method = root["method"].str();
  if (b.method != "at-moe" && b.method != "t-rex") root["method"].fail(fmt::format("'{}' (expected \"at-moe\" or \"t-rex\")", b.method));
  // The schema of version 1 is closed: a key not listed here is a typo or a newer version.
  if (b.method == "t-rex") root.only_keys({"format", "version", "base_model", "method", "t_rex"});
  else root.only_keys({"format", "version", "base_model", "method", "groups", "general_expert", "lambda", "router"});
  b.base_model = bundle_path(dir, root["base_model"].str(), m, "base_model");
  switch (path_kind(b.base_model, m + ": base_model")) {
    case PathKind::Missing: root["base_model"].fail(fmt::format("'{}' not found", b.base_model));
    case PathKind::Other: root["base_model"].fail(fmt::format("'{}' is not a regular file or a directory", b.base_model));
    default: break;
  }
  if (b.method == "t-rex") {
    const JsonAt t = root["t_rex"];
    t.object();
    t.only_keys({"adapter", "centroids", "intuition"});
    TrexSpec ts;
    ts.adapter_dir = bundle_path(dir, t["adapter"].str(), m, "t_rex.adapter");
    ts.centroids_file = bundle_path(dir, t["centroids"].str(), m, "t_rex.centroids");
    const JsonAt in = t["intuition"];
    in.object();
    const std::string src = in["source"].str();
    if (src != "embedding" && src != "hidden_state") in["source"].fail(fmt::format("'{}' (expected embedding or hidden_state)", src));
    ts.intuition_from_hidden = src == "hidden_state";
    if (ts.intuition_from_hidden) {
      in.only_keys({"source", "layer"});
      ts.hidden_layer = int(in["layer"].integer(0, 1023));
    } else {
      in.only_keys({"source"});
    }
    b.trex = ts;
    return b;
  }
  const JsonAt groups = root["groups"];
  if (groups.size() == 0 || !groups.value().is_array()) groups.fail("expected a non-empty list of groups");
  std::set<std::string> names, gnames;
  std::map<std::string, std::string> adapter_of;  // normalised adapter path -> expert
  auto read_expert = [&](const JsonAt& e, int group) {
    e.object();
    e.only_keys({"name", "adapter"});
    BundleExpert x;
    x.name = e["name"].str();
    check_name(e["name"], x.name);
    if (!names.insert(x.name).second) e["name"].fail(fmt::format("duplicate expert name '{}'", x.name));
    x.adapter_dir = bundle_path(dir, e["adapter"].str(), m, e.child("adapter"));
    auto [it, fresh] = adapter_of.emplace(x.adapter_dir, x.name);
    if (!fresh) e["adapter"].fail(fmt::format("adapter '{}' is already expert '{}': an expert belongs to one group", x.adapter_dir, it->second));
    x.group = group;
    return x;
  };
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const JsonAt g = groups.at(gi);
    g.object();
    g.only_keys({"name", "experts"});
    BundleGroup G;
    G.name = g["name"].str();
    check_name(g["name"], G.name);
    if (!gnames.insert(G.name).second) g["name"].fail(fmt::format("duplicate group name '{}'", G.name));
    const JsonAt ex = g["experts"];
    if (!ex.value().is_array() || ex.size() == 0) ex.fail(fmt::format("group '{}' needs a non-empty list of experts", G.name));
    for (size_t ei = 0; ei < ex.size(); ++ei) {
      G.experts.push_back(int(b.experts.size()));
      b.experts.push_back(read_expert(ex.at(ei), int(gi)));
    }
    b.groups.push_back(std::move(G));
  }
  if (root.has("general_expert")) b.general = read_expert(root["general_expert"], -1);
  // Experts and groups share one namespace (a --mask or --pin name must say which it is).
  for (size_t e = 0; e < b.experts.size(); ++e)
    if (gnames.count(b.experts[e].name))
      ATMOE_INPUT_ERROR("{}: expert '{}' has the name of a group: expert and group names must differ", m, b.experts[e].name);
  if (b.general && gnames.count(b.general->name))
    ATMOE_INPUT_ERROR("{}: general_expert '{}' has the name of a group", m, b.general->name);
  b.lambda = root.num_or("lambda", 1.0, 0.0, 1.0);
  if (root.has("lambda") && !b.general) root["lambda"].fail("weighs the mixture against general_expert, and there is none");
  if (b.general && !root.has("lambda"))
    root["general_expert"].fail("needs 'lambda' in [0, 1) (its weight is 1 - lambda; without lambda it would contribute nothing)");
  const JsonAt r = root["router"];
  r.object();
  r.only_keys({"file", "input", "tau_group", "tau_expert"});
  b.router_file = bundle_path(dir, r["file"].str(), m, "router.file");
  const std::string in = r.str_or("input", "per_request");
  if (in != "per_request" && in != "per_token") r["input"].fail(fmt::format("'{}' (expected per_request or per_token)", in));
  b.router_input = in == "per_token" ? RouterInput::PerToken : RouterInput::PerRequest;
  b.tau_group = r.num_or("tau_group", 1.0, 0.0, 1e6);
  b.tau_expert = r.num_or("tau_expert", 1.0, 0.0, 1e6);
  return b;
}

namespace {
void fnv(uint64_t& h, const std::string& s) {
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  h ^= 0xff;  // field separator
  h *= 1099511628211ull;
}
std::string slurp_or_empty(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return f ? std::string(std::istreambuf_iterator<char>(f), {}) : std::string();
}
std::string size_or_none(const fs::path& p) {
  std::error_code ec;
  const auto n = fs::file_size(p, ec);
  return ec ? std::string("none") : std::to_string(n);
}
}  // namespace

std::string bundle_fingerprint(const Bundle& b) {
  uint64_t h = 1469598103934665603ull;
  fnv(h, slurp_or_empty(b.manifest));
  auto expert = [&](const BundleExpert& e) {
    fnv(h, e.name);
    fnv(h, slurp_or_empty(fs::path(e.adapter_dir) / "adapter_config.json"));
    fnv(h, size_or_none(fs::path(e.adapter_dir) / "adapter_model.safetensors"));
  };
  for (const auto& e : b.experts) expert(e);
  if (b.general) expert(*b.general);
  if (!b.router_file.empty()) fnv(h, size_or_none(b.router_file));
  return fmt::format("{:016x}", h);
}

}  // namespace atmoe
