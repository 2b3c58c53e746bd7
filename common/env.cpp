#include "common/env.h"

#include <cstdlib>
#include <cstring>

#include "common/error.h"

namespace atmoe {

const std::vector<EnvKnob>& env_knobs() {
  static const std::vector<EnvKnob> k = {
      {"ATMOE_THREADS", "0", "compute threads for CPU kernels (0 = all cores)"},
      {"ATMOE_LOG_LEVEL", "warn", "trace|debug|info|warn|error|off"},
      {"ATMOE_CACHE", "", "cache directory for models fetched by deploy scripts (default <repo>/.cache)"},
      {"ATMOE_SPIN_US", "200", "microseconds an idle pool thread spins before it sleeps"},
      {"ATMOE_PREFILL_GEMM", "simd", "GEMM for prompts of >= 32 tokens: simd (atmoe's kernel) or blas (OpenBLAS sgemm)"},
      {"ATMOE_FORCE_ISA", "", "restrict CPU kernels: scalar|avx2|avx512 (default: best the CPU has)"},
  };
  return k;
}

std::string env_str(const char* name) {
  for (const auto& k : env_knobs()) {
    if (std::strcmp(k.name, name) == 0) {
      const char* v = std::getenv(name);
      return v ? std::string(v) : std::string(k.default_value);
    }
  }
  throw RuntimeError(std::string("undeclared environment knob ") + name);
}

long env_int(const char* name) {
  std::string s = env_str(name);
  if (s.empty()) return 0;
  char* end = nullptr;
  long v = std::strtol(s.c_str(), &end, 10);
  ATMOE_CHECK_INPUT(end && *end == '\0', "environment variable {}: expected an integer, got '{}'", name, s);
  return v;
}

}  // namespace atmoe
