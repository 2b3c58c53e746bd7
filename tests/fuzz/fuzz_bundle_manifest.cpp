// libFuzzer: the input is the text of a bundle manifest (atmoe.json). load_bundle_manifest
// either returns a bundle whose every resolved path lies inside the bundle directory, or
// raises InputError. The scratch bundle holds what the seeds name (tests/fuzz/seeds/
// bundle_manifest/): a placeholder base.gguf, an HF base directory, router and centroid
// files, expert and T-REX adapter directories.
#include <cstdint>
#include <string>

#include "common/bundle.h"
#include "common/error.h"
#include "tests/fuzz/fuzz_files.h"

namespace {
const std::string& bundle_dir() {
  static const std::string dir = [] {
    namespace fz = atmoe::fuzz;
    const std::string d = fz::scratch_dir() + "/bundle";
    fz::make_dirs(d + "/base_hf");
    fz::put_file(d + "/base_hf/config.json", std::string("{}"));
    fz::put_file(d + "/base.gguf", std::string("GGUF placeholder"));
    fz::put_file(d + "/router.safetensors", std::string("placeholder"));
    fz::put_file(d + "/centroids.safetensors", std::string("placeholder"));
    fz::put_file(d + "/centroids.npy", std::string("placeholder"));
    for (const char* e : {"cardio", "onco", "contracts", "torts", "general", "a", "b"})
      fz::make_dirs(d + "/experts/" + e);
    fz::make_dirs(d + "/trex");
    return d;
  }();
  return dir;
}

// Every resolved path must stay under the bundle directory (the manifest may not escape it).
void check_inside(const std::string& dir, const std::string& p) {
  if (p.compare(0, dir.size() + 1, dir + "/") != 0) __builtin_trap();
  if (p.find("/../") != std::string::npos || (p.size() >= 3 && p.compare(p.size() - 3, 3, "/..") == 0))
    __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = bundle_dir();
  atmoe::fuzz::put_file(dir + "/atmoe.json", data, size);
  try {
    atmoe::Bundle b = atmoe::load_bundle_manifest(dir);
    check_inside(dir, b.base_model);
    if (b.trex) {
      check_inside(dir, b.trex->adapter_dir);
      check_inside(dir, b.trex->centroids_file);
    } else {
      if (b.groups.empty() || b.experts.empty()) __builtin_trap();
      check_inside(dir, b.router_file);
      for (const auto& e : b.experts) {
        check_inside(dir, e.adapter_dir);
        if (e.group < 0 || size_t(e.group) >= b.groups.size() || b.expert_index(e.name) < 0) __builtin_trap();
      }
      if (b.general) check_inside(dir, b.general->adapter_dir);
      for (const auto& g : b.groups)
        for (int e : g.experts)
          if (e < 0 || size_t(e) >= b.experts.size()) __builtin_trap();
      if (!(b.lambda >= 0 && b.lambda <= 1)) __builtin_trap();
    }
    atmoe::fuzz::report("loaded");
  } catch (const atmoe::InputError& e) {
    atmoe::fuzz::report(e.what());
  }
  return 0;
}
