// Command-line routing controls shared by generate and explain:
//   --routing off  --adapter NAME  --pin g1=0.7,g2=0.3  --mask NAME,...  --group-bias g=1.5,...
//   --top-k-groups K  --tau-group T  --tau-expert T  --lambda L
#pragma once
#include <map>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "coordinator/router.h"

namespace atmoe::app {

struct RoutingFlags {
  std::string routing = "on", adapter, pin, mask, group_bias;
  int top_k_groups = 0;
  std::optional<double> tau_group, tau_expert, lambda;
  // T-REX
  std::string intuition_embedding, intuition = "on";
  std::optional<int> pin_cluster;
  std::optional<double> omega;
};

void add_routing_flags(CLI::App& app, RoutingFlags& f);
// InputError naming the flag for malformed lists ("name=value,...").
RoutingControls to_controls(const RoutingFlags& f);
std::map<std::string, double> parse_weight_list(const std::string& flag, const std::string& text);
// Routing controls need a bundle: InputError naming the flags given without one.
void refuse_routing_without_bundle(const RoutingControls& c);

}  // namespace atmoe::app
