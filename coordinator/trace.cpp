#include "coordinator/trace.h"

#include <algorithm>

#include "coordinator/trex_pool.h"

namespace atmoe {
using json = nlohmann::json;

json routing_trace(const Bundle& b, const SeqRouting& r, const std::vector<int32_t>& fed_tokens) {
  json layers = json::array();
  for (size_t l = 0; l < r.a.size(); ++l) {
    json g = json::object(), e = json::object();
    for (size_t i = 0; i < b.groups.size(); ++i) g[b.groups[i].name] = r.a[l][i];
    for (size_t i = 0; i < b.experts.size(); ++i) e[b.experts[i].name] = r.w[l][i];
    layers.push_back({{"layer", l}, {"groups", g}, {"experts", e}});
  }
  json out = {{"method", "at-moe"}, {"input", b.router_input == RouterInput::PerToken ? "per_token" : "per_request"},
              {"lambda", r.ctl.lambda}};
  if (b.general) out["general_expert"] = b.general->name;
  if (r.ctl.adapter >= 0) out["adapter"] = b.experts[size_t(r.ctl.adapter)].name;
  out["layers"] = layers;
  if (r.ctl.off) out["routing"] = "off";
  if (!r.tokens.empty()) {
    json toks = json::array();
    for (size_t t = 0; t < r.tokens.size(); ++t) {
      json tl = json::array();
      for (size_t l = 0; l < r.tokens[t].size(); ++l) {
        json g = json::object(), e = json::object();
        for (size_t i = 0; i < b.groups.size() && i < r.tokens_groups[t][l].size(); ++i) g[b.groups[i].name] = r.tokens_groups[t][l][i];
        for (size_t i = 0; i < b.experts.size() && i < r.tokens[t][l].size(); ++i) e[b.experts[i].name] = r.tokens[t][l][i];
        tl.push_back({{"layer", l}, {"groups", g}, {"experts", e}});
      }
      json tok = {{"position", t}};
      if (t < fed_tokens.size()) tok["token_id"] = fed_tokens[t];
      tok["layers"] = tl;
      toks.push_back(tok);
    }
    out["tokens"] = toks;
  }
  return out;
}

json trex_trace(const TrexPool& t, const SeqRouting& r) {
  json out = {{"method", "t-rex"}, {"mode", t.adapter().mode}, {"r1", t.adapter().r1}, {"r2", t.adapter().r2},
              {"experts_per_module", t.adapter().E}};
  if (r.ctl.off) {
    out["routing"] = "off";
    return out;
  }
  out["intuition"] = r.trex_ce;  // C e, one score per cluster
  if (r.trex_ctl.intuition_off) out["intuition_source"] = "off";
  else if (r.trex_ctl.pin_cluster >= 0) out["intuition_source"] = "cluster " + std::to_string(r.trex_ctl.pin_cluster);
  if (r.trex_ctl.omega) out["omega"] = *r.trex_ctl.omega;
  return out;
}

std::vector<std::pair<std::string, double>> heaviest_groups(const Bundle& b, const SeqRouting& r) {
  std::vector<std::pair<std::string, double>> g;
  for (size_t i = 0; i < b.groups.size(); ++i) {
    double s = 0;
    for (const auto& a : r.a) s += a[i];
    g.emplace_back(b.groups[i].name, r.a.empty() ? 0.0 : s / double(r.a.size()));
  }
  std::stable_sort(g.begin(), g.end(), [](auto& x, auto& y) { return x.second > y.second; });
  return g;
}

}  // namespace atmoe
