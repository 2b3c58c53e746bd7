// Shared by the parity tests that rebuild synth models/bundles from golden files.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <fstream>
#include <iterator>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "coordinator/synth_model.h"

namespace atmoe::test {

// FNV-1a-64 of a file (the goldens' scripts compute the same in Python).
inline std::string fnv1a64(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return fmt::format("{:016x}", h);
}

// The value after `name` in a recorded command line, or `def`.
inline std::string cli_arg(const nlohmann::json& args, const std::string& name, const std::string& def) {
  for (size_t i = 0; i + 1 < args.size(); ++i)
    if (args[i] == name) return args[i + 1].get<std::string>();
  return def;
}

inline bool cli_flag(const nlohmann::json& args, const std::string& name) {
  for (const auto& a : args)
    if (a == name) return true;
  return false;
}

// Loads tests/parity/goldens/<name> (ATMOE_GOLDENS overrides the directory).
inline nlohmann::json load_golden(const std::string& name) {
  const char* gd = std::getenv("ATMOE_GOLDENS");
  std::ifstream f(std::string(gd ? gd : "tests/parity/goldens") + "/" + name);
  if (!f) return nlohmann::json();
  return nlohmann::json::parse(f);
}

// Largest relative L2 error over the rows of [rows, cols] logits.
inline double worst_row_rel_l2(const std::vector<float>& got, const std::vector<double>& want, int64_t rows, int64_t cols) {
  double worst = 0;
  for (int64_t t = 0; t < rows; ++t) {
    double n = 0, d = 0;
    for (int64_t v = 0; v < cols; ++v) {
      const double x = got[size_t(t * cols + v)] - want[size_t(t * cols + v)];
      n += x * x;
      d += want[size_t(t * cols + v)] * want[size_t(t * cols + v)];
    }
    worst = std::max(worst, std::sqrt(n / d));
  }
  return worst;
}

// Rebuilds the synth-model a golden was made from (its recorded synth-model arguments).
inline SynthModelOptions synth_model_options(const nlohmann::json& a, const std::string& out) {
  SynthModelOptions mo;
  mo.out = out;
  mo.seed = std::stoull(cli_arg(a, "--seed", "0"));
  mo.layers = std::stoi(cli_arg(a, "--layers", std::to_string(mo.layers)));
  mo.hidden = std::stoi(cli_arg(a, "--hidden", std::to_string(mo.hidden)));
  mo.heads = std::stoi(cli_arg(a, "--heads", std::to_string(mo.heads)));
  mo.kv_heads = std::stoi(cli_arg(a, "--kv-heads", std::to_string(mo.kv_heads)));
  mo.ffn = std::stoi(cli_arg(a, "--ffn", std::to_string(mo.ffn)));
  mo.vocab = std::stoi(cli_arg(a, "--vocab", std::to_string(mo.vocab)));
  return mo;
}

}  // namespace atmoe::test
