// The bundle manifest, atmoe.json (docs/bundle-format.md). Version 1:
//   {"format": "atmoe-bundle", "version": 1,
//    "base_model": "base.gguf",                       // file or HF directory
//    "method": "at-moe",
//    "groups": [{"name": "medicine", "experts": [{"name": "cardio", "adapter": "experts/cardio"}, ...]}, ...],
//    "general_expert": {"name": "general", "adapter": "experts/general"},   // optional
//    "lambda": 1.0,                                                          // optional
//    "router": {"file": "router.safetensors", "input": "per_request" | "per_token",
//               "tau_group": 1.0, "tau_expert": 1.0}}
// Every path is relative to the bundle directory and must stay inside it (no absolute
// paths, no ".." components); a symlink inside the bundle may point elsewhere.
// Expert index e follows manifest order: group by group, expert by expert.
#pragma once
#include <optional>
#include <string>
#include <vector>

namespace atmoe {

struct BundleExpert {
  std::string name, adapter_dir;  // adapter_dir: resolved path
  int group = -1;                 // -1 for the general expert
};

struct BundleGroup {
  std::string name;
  std::vector<int> experts;  // expert indices
};

enum class RouterInput { PerRequest, PerToken };

// method "t-rex":
//   "t_rex": {"adapter": "trex", "centroids": "centroids.safetensors",
//             "intuition": {"source": "embedding"} | {"source": "hidden_state", "layer": 6}}
// centroids: safetensors with key "centroids" [K, d_e] (or a 2-D float .npy file).
struct TrexSpec {
  std::string adapter_dir, centroids_file;
  bool intuition_from_hidden = false;  // else: an embedding given with the request
  int hidden_layer = 0;
};

struct Bundle {
  std::string dir, manifest;  // bundle directory, path of atmoe.json
  std::string base_model;     // resolved path
  std::string method;         // "at-moe"
  std::vector<BundleGroup> groups;
  std::vector<BundleExpert> experts;
  std::optional<BundleExpert> general;
  double lambda = 1.0;
  std::string router_file;  // resolved path
  RouterInput router_input = RouterInput::PerRequest;
  double tau_group = 1.0, tau_expert = 1.0;
  std::optional<TrexSpec> trex;  // method "t-rex"

  int expert_index(const std::string& name) const;  // -1 when absent
  int group_index(const std::string& name) const;   // -1 when absent
};

Bundle load_bundle_manifest(const std::string& dir);
// A fingerprint of what a bundle's ranks must agree on: atmoe.json and every adapter's
// adapter_config.json byte for byte, and the sizes of the weight files (hex, 16 digits).
std::string bundle_fingerprint(const Bundle& b);
// Joins a manifest path onto the bundle dir after checking it stays inside (InputError
// naming the manifest and field otherwise).
std::string bundle_path(const std::string& dir, const std::string& rel, const std::string& manifest,
                        const std::string& field);

}  // namespace atmoe
