#include "coordinator/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include <fmt/ranges.h>

#include "common/error.h"
#include "common/safetensors.h"
#include "common/tensor_check.h"

namespace atmoe {

std::vector<std::string> RoutingControls::atmoe_set() const {
  std::vector<std::string> s;
  if (!adapter.empty()) s.push_back("adapter");
  if (!pin.empty()) s.push_back("pin");
  if (!mask.empty()) s.push_back("mask");
  if (!group_bias.empty()) s.push_back("group_bias");
  if (top_k_groups != 0) s.push_back("top_k_groups");
  if (tau_group) s.push_back("tau_group");
  if (tau_expert) s.push_back("tau_expert");
  if (lambda) s.push_back("lambda");
  return s;
}

std::vector<std::string> RoutingControls::trex_set() const {
  std::vector<std::string> s;
  if (!intuition_embedding.empty()) s.push_back("intuition_embedding");
  if (intuition_off) s.push_back("intuition");
  if (pin_cluster >= 0) s.push_back("pin_cluster");
  if (omega) s.push_back("omega");
  return s;
}

ResolvedRouting resolve_routing(const Bundle& b, const RoutingControls& c) {
  const auto at = c.atmoe_set(), tx = c.trex_set();
  ATMOE_CHECK_INPUT(tx.empty(), "routing: {} applies to t-rex bundles; {} is an at-moe bundle", fmt::join(tx, ", "), b.dir);
  ATMOE_CHECK_INPUT(!c.off || at.empty(), "routing: off runs the base model only; it cannot be combined with {}", fmt::join(at, ", "));
  ATMOE_CHECK_INPUT(c.adapter.empty() || at.size() == 1,
                    "routing: adapter serves one expert alone at weight 1; it cannot be combined with {}",
                    fmt::join(at.begin() + 1, at.end(), ", "));
  ATMOE_CHECK_INPUT(!c.lambda || b.general, "routing: lambda weighs the mixture against the general expert, and {} has none",
                    b.dir);
  const int G = int(b.groups.size()), E = int(b.experts.size());
  ResolvedRouting r;
  r.off = c.off;
  r.expert_masked.assign(size_t(E), false);
  r.group_masked.assign(size_t(G), false);
  r.group_bias.assign(size_t(G), 0.0);
  r.tau_g = c.tau_group.value_or(b.tau_group);
  r.tau_e = c.tau_expert.value_or(b.tau_expert);
  r.lambda = c.lambda.value_or(b.lambda);
  ATMOE_CHECK_INPUT(std::isfinite(r.tau_g) && r.tau_g >= 0 && r.tau_g <= 1e6, "routing: tau_group {} must be in [0, 1e6]", r.tau_g);
  ATMOE_CHECK_INPUT(std::isfinite(r.tau_e) && r.tau_e >= 0 && r.tau_e <= 1e6, "routing: tau_expert {} must be in [0, 1e6]", r.tau_e);
  ATMOE_CHECK_INPUT(std::isfinite(r.lambda) && r.lambda >= 0 && r.lambda <= 1, "routing: lambda {} must be in [0, 1]", r.lambda);
  if (!c.adapter.empty()) {
    r.adapter = b.expert_index(c.adapter);
    ATMOE_CHECK_INPUT(r.adapter >= 0, "routing: adapter '{}' is not an expert of this bundle", c.adapter);
    r.lambda = 1.0;  // the expert alone at weight 1: the general expert's share is 1 - lambda = 0
  }
  for (const auto& n : c.mask) {
    int e = b.expert_index(n), g = b.group_index(n);
    ATMOE_CHECK_INPUT(e >= 0 || g >= 0, "routing: mask '{}' is neither an expert nor a group of this bundle", n);
    if (e >= 0) r.expert_masked[size_t(e)] = true;
    if (g >= 0) r.group_masked[size_t(g)] = true;
  }
  for (int g = 0; g < G; ++g) {
    bool all = true;
    for (int e : b.groups[size_t(g)].experts) all = all && r.expert_masked[size_t(e)];
    if (all) r.group_masked[size_t(g)] = true;
    if (r.group_masked[size_t(g)])
      for (int e : b.groups[size_t(g)].experts) r.expert_masked[size_t(e)] = true;
  }
  for (const auto& [n, v] : c.group_bias) {
    int g = b.group_index(n);
    ATMOE_CHECK_INPUT(g >= 0, "routing: group_bias '{}' is not a group of this bundle", n);
    ATMOE_CHECK_INPUT(std::isfinite(v), "routing: group_bias '{}' must be finite", n);
    r.group_bias[size_t(g)] = v;
  }
  if (!c.pin.empty()) {
    // Names are groups or experts; an expert's weight goes to its group and fixes the mix
    // inside it. A group pinned both ways is ambiguous.
    r.pin.assign(size_t(G), 0.0);
    std::vector<double> pe(size_t(E), 0.0);
    std::vector<int> how(size_t(G), 0);  // 1: by name, 2: through its experts
    // Weights are scaled by the largest first: their sum stays finite whatever they are
    // (1e308 twice would overflow and leave NaN weights), and only their ratios matter.
    double vmax = 0;
    for (const auto& [n, v] : c.pin)
      if (std::isfinite(v)) vmax = std::max(vmax, v);
    double sum = 0;
    for (const auto& [n, v0] : c.pin) {
      const double v = vmax > 0 && std::isfinite(v0) && v0 >= 0 ? v0 / vmax : v0;
      const int g = b.group_index(n);
      int e = b.expert_index(n);
      ATMOE_CHECK_INPUT(g >= 0 || e >= 0, "routing: pin '{}' is neither a group nor an expert of this bundle", n);
      if (g >= 0) e = -1;  // a name that is both (a one-expert group named as its expert) pins the group
      ATMOE_CHECK_INPUT(std::isfinite(v) && v >= 0, "routing: pin weight for '{}' must be >= 0, got {}", n, v0);
      const int gg = g >= 0 ? g : b.experts[size_t(e)].group;
      ATMOE_CHECK_INPUT(!(v > 0 && (r.group_masked[size_t(gg)] || (e >= 0 && r.expert_masked[size_t(e)]))),
                        "routing: '{}' is both pinned and masked", n);
      const int kind = g >= 0 ? 1 : 2;
      ATMOE_CHECK_INPUT(how[size_t(gg)] == 0 || how[size_t(gg)] == kind,
                        "routing: group '{}' is pinned both by name and through its experts", b.groups[size_t(gg)].name);
      how[size_t(gg)] = kind;
      r.pin[size_t(gg)] += v;
      if (e >= 0) pe[size_t(e)] = v;
      sum += v;
    }
    ATMOE_CHECK_INPUT(sum > 0, "routing: pin weights must sum to a positive value");
    for (auto& v : r.pin) v /= sum;
    for (int g = 0; g < G; ++g)
      if (how[size_t(g)] == 2 && r.pin[size_t(g)] > 0) {
        if (r.pin_expert.empty()) r.pin_expert.assign(size_t(E), 0.0);
        double z = 0;
        for (int e : b.groups[size_t(g)].experts) z += pe[size_t(e)];
        for (int e : b.groups[size_t(g)].experts) r.pin_expert[size_t(e)] = pe[size_t(e)] / z;
      }
  }
  int live = 0;
  for (int g = 0; g < G; ++g) live += !r.group_masked[size_t(g)];
  ATMOE_CHECK_INPUT(r.adapter >= 0 || r.off || live > 0, "routing: every group is masked");
  ATMOE_CHECK_INPUT(c.top_k_groups >= 0 && c.top_k_groups <= G, "routing: top_k_groups {} out of range 1..{}", c.top_k_groups, G);
  r.top_k = c.top_k_groups;
  return r;
}

// softmax(x / tau) over the entries with keep[i]; tau == 0 -> one-hot argmax (lowest index).
static void masked_softmax(const double* x, const std::vector<int>& idx, const std::vector<bool>& keep, double tau,
                           double* out) {
  int best = -1;
  double m = -INFINITY;
  for (int i : idx)
    if (keep[size_t(i)] && (best < 0 || x[i] > m)) m = x[i], best = i;
  for (int i : idx) out[i] = 0.0;
  if (best < 0) return;
  if (tau == 0) {
    out[best] = 1.0;
    return;
  }
  double z = 0;
  for (int i : idx)
    if (keep[size_t(i)]) z += (out[i] = std::exp((x[i] - m) / tau));
  for (int i : idx) out[i] /= z;
}

void route_from_logits(const Bundle& b, const double* gl, const double* el, const ResolvedRouting& r, double* a,
                       double* w) {
  const int G = int(b.groups.size()), E = int(b.experts.size());
  std::fill(a, a + G, 0.0);
  std::fill(w, w + E, 0.0);
  if (r.off) return;
  if (r.adapter >= 0) {
    w[r.adapter] = 1.0;
    a[b.experts[size_t(r.adapter)].group] = 1.0;
    return;
  }
  std::vector<int> gidx(static_cast<size_t>(G));
  std::iota(gidx.begin(), gidx.end(), 0);
  std::vector<bool> gkeep(static_cast<size_t>(G));
  for (int g = 0; g < G; ++g) gkeep[size_t(g)] = !r.group_masked[size_t(g)];
  if (!r.pin.empty()) {
    for (int g = 0; g < G; ++g) a[g] = r.pin[size_t(g)];
  } else {
    std::vector<double> x(static_cast<size_t>(G));
    for (int g = 0; g < G; ++g) x[size_t(g)] = gl[g] + r.group_bias[size_t(g)];
    masked_softmax(x.data(), gidx, gkeep, r.tau_g, a);
  }
  if (r.top_k > 0 && r.top_k < G) {
    std::vector<int> order(gidx);
    std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return a[i] > a[j]; });
    double z = 0;
    for (int k = 0; k < G; ++k) {
      if (k >= r.top_k) a[order[size_t(k)]] = 0.0;
      z += a[order[size_t(k)]];
    }
    if (z > 0)
      for (int g = 0; g < G; ++g) a[g] /= z;
  }
  std::vector<bool> ekeep(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) ekeep[size_t(e)] = !r.expert_masked[size_t(e)];
  std::vector<double> c(static_cast<size_t>(E));
  for (int g = 0; g < G; ++g) {
    const auto& ge = b.groups[size_t(g)].experts;
    const bool fixed =
        !r.pin_expert.empty() && std::any_of(ge.begin(), ge.end(), [&](int e) { return r.pin_expert[size_t(e)] > 0; });
    if (fixed)
      for (int e : ge) c[size_t(e)] = r.pin_expert[size_t(e)];
    else
      masked_softmax(el, ge, ekeep, r.tau_e, c.data());
    for (int e : ge) w[e] = a[g] * c[size_t(e)];
  }
}

Router::Router(const Bundle& b, int n_layers, int64_t hidden, bool zero)
    : b_(b), G_(int(b.groups.size())), E_(int(b.experts.size())), d_(hidden) {
  if (zero) {
    for (int l = 0; l < n_layers; ++l) {
      wg_.push_back(Tensor::empty(DType::F32, {G_, d_}));
      bg_.emplace_back();
      wd_.push_back(Tensor::empty(DType::F32, {E_, d_}));
      bd_.emplace_back();
    }
    return;
  }
  SafetensorsFile f(b.router_file);
  auto get = [&](const std::string& k, std::vector<int64_t> shape, bool required) -> Tensor {
    if (!f.has(k)) {
      ATMOE_CHECK_INPUT(!required, "{}: missing tensor '{}' (expected shape {})", b.router_file, k, shape_to_string(shape));
      return Tensor();
    }
    Tensor t = f.get(k);
    ATMOE_CHECK_INPUT(t.shape() == shape, "{}: tensor '{}' has shape {}, expected {}", b.router_file, k, t.shape_str(),
                      shape_to_string(shape));
    ATMOE_CHECK_INPUT(t.dtype() == DType::F32 || t.dtype() == DType::F16 || t.dtype() == DType::BF16,
                      "{}: tensor '{}' has dtype {}, expected F32, F16 or BF16", b.router_file, k, dtype_name(t.dtype()));
    check_finite(t, b.router_file, k);
    return t.to(DType::F32);
  };
  // Only the keys of DESIGN 2 for this base's layers: anything else is a router for another
  // base or bundle, or a typo.
  std::set<std::string> known;
  for (int l = 0; l < n_layers; ++l)
    for (const char* k : {"group_gate.weight", "group_gate.bias", "expert_gate.weight", "expert_gate.bias"})
      known.insert("layers." + std::to_string(l) + "." + k);
  for (const auto& k : f.names())
    ATMOE_CHECK_INPUT(known.count(k), "{}: unexpected tensor '{}' (expected layers.0..{}.group_gate|expert_gate.weight|bias)",
                      b.router_file, k, n_layers - 1);
  for (int l = 0; l < n_layers; ++l) {
    std::string p = "layers." + std::to_string(l) + ".";
    wg_.push_back(get(p + "group_gate.weight", {G_, d_}, true));
    bg_.push_back(get(p + "group_gate.bias", {G_}, false));
    wd_.push_back(get(p + "expert_gate.weight", {E_, d_}, true));
    bd_.push_back(get(p + "expert_gate.bias", {E_}, false));
  }
}

void Router::route(int layer, const float* u, const ResolvedRouting& r, double* a, double* w) const {
  std::vector<double> gl(static_cast<size_t>(G_)), el(static_cast<size_t>(E_));
  const Tensor &WG = wg_[size_t(layer)], &BG = bg_[size_t(layer)], &WD = wd_[size_t(layer)], &BD = bd_[size_t(layer)];
  for (int g = 0; g < G_; ++g) {
    double s = BG.numel() && BG.raw() ? BG.data<float>()[g] : 0.0;
    for (int64_t i = 0; i < d_; ++i) s += double(WG.data<float>()[g * d_ + i]) * u[i];
    gl[size_t(g)] = s;
  }
  for (int e = 0; e < E_; ++e) {
    double s = BD.numel() && BD.raw() ? BD.data<float>()[e] : 0.0;
    for (int64_t i = 0; i < d_; ++i) s += double(WD.data<float>()[e * d_ + i]) * u[i];
    el[size_t(e)] = s;
  }
  route_from_logits(b_, gl.data(), el.data(), r, a, w);
}

}  // namespace atmoe
