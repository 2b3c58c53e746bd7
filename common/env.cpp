#include "common/env.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/error.h"

namespace atmoe {

const std::vector<EnvKnob>& env_knobs() {
  static const std::vector<EnvKnob> k = {
      {"ATMOE_THREADS", "0",
       "compute threads for CPU kernels; more than the usable cores (affinity mask: taskset, cpusets) is clamped "
       "with a warning. 0 = usable cores / MPI ranks on this node (OMPI_COMM_WORLD_LOCAL_SIZE, else "
       "MPI_LOCALNRANKS, else PMI_LOCAL_SIZE; at least 1)",
       nullptr, true, 0, 1024},
      {"ATMOE_LOG_LEVEL", "warn", "trace|debug|info|warn|error|critical|off",
       "trace|debug|info|warn|error|critical|off"},
      {"ATMOE_CACHE", "", "cache directory for models fetched by deploy scripts (default <repo>/.cache)"},
      {"ATMOE_MPI_PROGRESS", "poll",
       "coordinator under mpirun: poll = advance the in-flight expert messages between chunks of the base GEMM "
       "(Open MPI moves a rendezvous message only inside MPI calls); none = only when waiting for them",
       "poll|none"},
      {"ATMOE_SPIN_US", "200",
       "microseconds a waiting pool thread (idle worker, the caller at the end of a parallel region, a barrier) "
       "polls before it blocks on a futex: _mm_pause for the first 20 us, then sched_yield (0..1000000)",
       nullptr, true, 0, 1000000},
      {"ATMOE_PREFILL_GEMM", "simd", "GEMM for prompts of >= 32 tokens: simd (atmoe's kernel) or blas (OpenBLAS sgemm)",
       "simd|blas"},
      {"ATMOE_WORKER_TIMEOUT", "60",
       "seconds the coordinator waits for a worker rank's answer once loading is done; then it reports the rank and "
       "host and ends the job (1..86400)",
       nullptr, true, 1, 86400},
      {"ATMOE_LOAD_TIMEOUT", "600",
       "seconds the coordinator waits for every worker rank to load its experts (1..86400)", nullptr, true, 1, 86400},
      {"ATMOE_API_KEY", "",
       "atmoe serve: the API key when --api-key is not given (every endpoint but /health needs it)", nullptr},
      {"ATMOE_FORCE_ISA", "", "restrict CPU kernels: scalar|avx2|avx512 (unset: the best the CPU has)",
       "scalar|avx2|avx512"},
      {"ATMOE_GEMV_PREFETCH", "auto",
       "decode GEMV prefetches the weight rows ahead of its loads: on, off, or auto (on for Intel CPUs, off otherwise: "
       "what measured faster on each)",
       "auto|on|off"},
  };
  return k;
}

static const EnvKnob& knob(const char* name) {
  for (const auto& k : env_knobs())
    if (std::strcmp(k.name, name) == 0) return k;
  throw RuntimeError(std::string("undeclared environment knob ") + name);
}

static std::string checked(const EnvKnob& k) {
  const char* raw = std::getenv(k.name);
  if (!raw) return k.default_value;
  std::string v(raw);
  if (k.integer) {
    errno = 0;
    char* end = nullptr;
    const long long x = std::strtoll(v.c_str(), &end, 10);
    ATMOE_CHECK_INPUT(!v.empty() && end && *end == '\0' && errno == 0 && x >= k.lo && x <= k.hi,
                      "environment variable {}='{}': expected an integer in {}..{}", k.name, v.substr(0, 40), k.lo, k.hi);
  } else if (k.choices && !(v.empty() && std::strlen(k.default_value) == 0)) {
    bool ok = false;
    const std::string c = k.choices;
    for (size_t a = 0; a <= c.size();) {
      size_t b = c.find('|', a);
      if (b == std::string::npos) b = c.size();
      ok = ok || (b - a == v.size() && c.compare(a, b - a, v) == 0);
      a = b + 1;
    }
    ATMOE_CHECK_INPUT(ok, "environment variable {}='{}': expected one of {}", k.name, v.substr(0, 40), k.choices);
  }
  return v;
}

std::string env_str(const char* name) { return checked(knob(name)); }

int64_t env_int(const char* name) {
  const EnvKnob& k = knob(name);
  ATMOE_ASSERT(k.integer);
  return std::strtoll(checked(k).c_str(), nullptr, 10);
}

void env_check_all() {
  for (const auto& k : env_knobs()) (void)checked(k);
}

}  // namespace atmoe
