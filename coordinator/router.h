// AT-MoE grouped routing (DESIGN.md 1.1), exactly:
//   a_l    = softmax((W_G^l u + b_G^l + group_bias) / τ_g)            over groups
//   c_l[e] = softmax_{e' in group(e)}((W_D^l u + b_D^l) / τ_e)         inside each group
//   w_l[e] = a_l[group(e)] · c_l[e]
// with the per-request controls: mask (experts or groups; the softmaxes renormalise over
// the rest; a group whose experts are all masked is masked), pin (fixed weights of groups or
// experts, normalised over all pins: a pinned group replaces the group softmax; pinned experts
// also fix the mix inside their group, their weights summing to the group's; a name that is
// both a group and an expert means the group), top_k_groups (keep the k heaviest groups,
// renormalise), tau_group / tau_expert (τ = 0: one-hot argmax, lowest index on ties),
// lambda, adapter (one expert at weight 1), routing off.
// Router file: router.safetensors, keys layers.{l}.group_gate.weight [G, d] (+ .bias [G]),
// layers.{l}.expert_gate.weight [E, d] (+ .bias [E]), experts in manifest order.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/bundle.h"
#include "common/tensor.h"

namespace atmoe {

// What a request may say about routing (all optional). Names refer to the bundle.
struct RoutingControls {
  bool off = false;                          // base model only
  std::string adapter;                       // plain single-LoRA serving
  std::map<std::string, double> pin;         // group or expert -> weight
  std::vector<std::string> mask;             // expert or group names
  std::map<std::string, double> group_bias;  // group -> added logit
  int top_k_groups = 0;                      // 0 = all
  std::optional<double> tau_group, tau_expert, lambda;
  // T-REX bundles: the request's embedding (intuition source "embedding"), or the
  // intuition switched off (s = 0), or pinned to a cluster, and an ω' override.
  std::vector<float> intuition_embedding;
  bool intuition_off = false;
  int pin_cluster = -1;
  std::optional<double> omega;

  // Which controls are set: AT-MoE's (adapter, pin, mask, group_bias, top_k_groups, tau_*,
  // lambda) and T-REX's (intuition_embedding, intuition_off, pin_cluster, omega), by name.
  std::vector<std::string> atmoe_set() const;
  std::vector<std::string> trex_set() const;
};

// Controls checked against a bundle and turned into indices.
struct ResolvedRouting {
  bool off = false;
  int adapter = -1;                      // expert index, or -1
  std::vector<double> pin;               // [G]; empty = no pin
  std::vector<double> pin_expert;        // [E]: the mix inside groups pinned through their experts
                                         // (sums to 1 over such a group's experts); empty = none
  std::vector<bool> expert_masked;       // [E]
  std::vector<bool> group_masked;        // [G]
  std::vector<double> group_bias;        // [G]
  int top_k = 0;
  double tau_g = 1, tau_e = 1, lambda = 1;
};
// InputError (one line naming the control) for unknown names, negative temperatures,
// pins that do not sum to a positive value, top-k out of range, everything masked, and
// controls that do not apply: any control with routing off; any other control with
// `adapter` (one expert alone at weight 1: no mixture, no general expert); lambda on a
// bundle without a general expert; T-REX controls on an AT-MoE bundle.
ResolvedRouting resolve_routing(const Bundle& b, const RoutingControls& c);

class Router {
 public:
  // Loads and checks router.safetensors. zero: an all-zero router instead, the file not read
  // (atmoe fit-router, which routes by pins only, before a router exists or fits the bundle).
  Router(const Bundle& b, int n_layers, int64_t hidden, bool zero = false);
  int n_groups() const { return G_; }
  int n_experts() const { return E_; }
  // u: [hidden] router input of layer l. Writes a [G] and w [E] (w sums to 1 over experts
  // unless routing is off or everything is masked).
  void route(int layer, const float* u, const ResolvedRouting& r, double* a, double* w) const;

 private:
  const Bundle& b_;
  int G_, E_;
  int64_t d_;
  std::vector<Tensor> wg_, bg_, wd_, bd_;  // per layer, f32 (bias may be undefined)
};

// The float64 specification of route() given the logits, shared by the router and tests:
// group_logits [G] (W_G u + b_G), expert_logits [E] (W_D u + b_D).
void route_from_logits(const Bundle& b, const double* group_logits, const double* expert_logits,
                       const ResolvedRouting& r, double* a, double* w);

}  // namespace atmoe
