#include "apps/routing_flags.h"

#include <cctype>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/commands.h"
#include "common/error.h"
#include "common/files.h"

namespace atmoe::app {

void add_routing_flags(CLI::App& app, RoutingFlags& f) {
  app.add_option("--routing", f.routing, "on (default) or off: off runs the base model only");
  app.add_option("--adapter", f.adapter, "Serve one expert at weight 1 (plain LoRA)");
  app.add_option("--pin", f.pin, "Fixed weights of groups or experts, e.g. medicine=0.7,law=0.3 (normalised)");
  app.add_option("--mask", f.mask, "Experts or groups to exclude, comma-separated");
  app.add_option("--group-bias", f.group_bias, "Added to group logits, e.g. law=1.5");
  app.add_option("--top-k-groups", f.top_k_groups, "Keep the k heaviest groups (0 = all)");
  app.add_option("--tau-group", f.tau_group, "Group softmax temperature (0 = argmax)");
  app.add_option("--tau-expert", f.tau_expert, "Expert softmax temperature (0 = argmax)");
  app.add_option("--lambda", f.lambda, "Weight of the mixture against the general expert, in [0, 1]");
  app.add_option("--intuition-embedding", f.intuition_embedding,
                 "T-REX: a FILE holding the request's embedding (a JSON array or whitespace-separated numbers)");
  app.add_option("--intuition", f.intuition, "T-REX: on (default) or off (s = 0)");
  app.add_option("--pin-cluster", f.pin_cluster, "T-REX: take the intuition of cluster K");
  app.add_option("--omega", f.omega, "T-REX: override ω' (token router share) in [0, 1]");
}

std::map<std::string, double> parse_weight_list(const std::string& flag, const std::string& text) {
  std::map<std::string, double> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    ATMOE_CHECK_INPUT(!item.empty(), "{} '{}': an empty item (expected NAME=NUMBER[,NAME=NUMBER...])", flag, text);
    size_t eq = item.find('=');
    ATMOE_CHECK_INPUT(eq != std::string::npos && eq > 0 && eq + 1 < item.size(), "{} '{}': expected NAME=NUMBER[,NAME=NUMBER...]",
                      flag, text);
    std::string name = item.substr(0, eq), num = item.substr(eq + 1);
    char* end = nullptr;
    double v = std::strtod(num.c_str(), &end);
    ATMOE_CHECK_INPUT(end && *end == '\0' && std::isfinite(v) && !std::isspace(static_cast<unsigned char>(num[0])),
                      "{} '{}': '{}' is not a number", flag, text, num);
    ATMOE_CHECK_INPUT(!out.count(name), "{} '{}': '{}' given twice", flag, text, name);
    out[name] = v;
  }
  ATMOE_CHECK_INPUT(!out.empty() && text.back() != ',', "{} '{}': expected NAME=NUMBER[,NAME=NUMBER...]", flag, text);
  return out;
}

RoutingControls to_controls(const RoutingFlags& f) {
  RoutingControls c;
  ATMOE_CHECK_INPUT(f.routing == "on" || f.routing == "off", "--routing '{}': expected on or off", f.routing);
  c.off = f.routing == "off";
  c.adapter = f.adapter;
  if (!f.pin.empty()) c.pin = parse_weight_list("--pin", f.pin);
  if (!f.group_bias.empty()) c.group_bias = parse_weight_list("--group-bias", f.group_bias);
  if (!f.mask.empty()) {
    std::stringstream ss(f.mask);
    std::string item;
    while (std::getline(ss, item, ',')) {
      ATMOE_CHECK_INPUT(!item.empty(), "--mask '{}': an empty name (expected NAME[,NAME...])", f.mask);
      c.mask.push_back(item);
    }
    ATMOE_CHECK_INPUT(f.mask.back() != ',', "--mask '{}': an empty name (expected NAME[,NAME...])", f.mask);
  }
  c.top_k_groups = f.top_k_groups;
  c.tau_group = f.tau_group;
  c.tau_expert = f.tau_expert;
  c.lambda = f.lambda;
  ATMOE_CHECK_INPUT(f.intuition == "on" || f.intuition == "off", "--intuition '{}': expected on or off", f.intuition);
  c.intuition_off = f.intuition == "off";
  if (f.pin_cluster) {
    ATMOE_CHECK_INPUT(*f.pin_cluster >= 0, "--pin-cluster {}: expected a cluster index >= 0", *f.pin_cluster);
    c.pin_cluster = *f.pin_cluster;
  }
  c.omega = f.omega;
  if (!f.intuition_embedding.empty()) {
    const std::string text = read_file(f.intuition_embedding, "--intuition-embedding", size_t(64) << 20);
    const std::string& file = f.intuition_embedding;
    const size_t first = text.find_first_not_of(" \t\r\n");
    if (first != std::string::npos && text[first] == '[') {  // a JSON array of numbers
      const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
      ATMOE_CHECK_INPUT(!j.is_discarded() && j.is_array(), "{}: not a JSON array of numbers", file);
      for (size_t i = 0; i < j.size(); ++i) {
        ATMOE_CHECK_INPUT(j[i].is_number() && std::isfinite(float(j[i].get<double>())),
                          "{}: element {} is not a finite float32 number", file, i);
        c.intuition_embedding.push_back(float(j[i].get<double>()));
      }
    } else {  // whitespace-separated numbers
      std::stringstream ns(text);
      std::string tok;
      while (ns >> tok) {
        char* end = nullptr;
        double v = std::strtod(tok.c_str(), &end);
        ATMOE_CHECK_INPUT(end && *end == '\0' && std::isfinite(float(v)),
                          "{}: '{}' is not a number (expected a JSON array or whitespace-separated numbers)", file,
                          tok.substr(0, 40));
        c.intuition_embedding.push_back(float(v));
      }
    }
    ATMOE_CHECK_INPUT(!c.intuition_embedding.empty(), "{}: no numbers", f.intuition_embedding);
  }
  return c;
}

void refuse_routing_without_bundle(const RoutingControls& c) {
  auto set = c.atmoe_set();
  for (auto& t : c.trex_set()) set.push_back(t);
  ATMOE_CHECK_INPUT(set.empty() && !c.off, "routing controls ({}) need --bundle: --model alone runs the base model",
                    c.off ? "--routing off" : flag_names(set));
}

}  // namespace atmoe::app
