// Shared by the parity tests that rebuild synth models/bundles from golden files.
#pragma once
#include <cstdint>
#include <fstream>
#include <iterator>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

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

}  // namespace atmoe::test
