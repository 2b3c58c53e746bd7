// Wall-clock and process-memory probes shared by the timers (dispatch split, MPI waits,
// worker stats, benchmarks).
#pragma once
#include <sys/resource.h>

#include <chrono>
#include <cstdint>

namespace atmoe {

// Seconds on the monotonic clock (differences only).
inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// This process's peak resident set, KiB (getrusage; Linux reports ru_maxrss in KiB).
inline int64_t peak_rss_kib() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return int64_t(ru.ru_maxrss);
}

}  // namespace atmoe
