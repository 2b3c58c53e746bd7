#include "common/log.h"

#include <mutex>

#include <spdlog/sinks/stdout_color_sinks.h>

#include "common/env.h"
#include "common/error.h"

namespace atmoe {
namespace {
std::mutex g_mu;
int g_rank = -1;
bool g_init = false;
spdlog::sink_ptr g_sink;

// The level of ATMOE_LOG_LEVEL; a bad value falls back to warn here and is refused by
// env_check_all() (logging starts before main can report errors).
spdlog::level::level_enum env_level() {
  std::string s;
  try {
    s = env_str("ATMOE_LOG_LEVEL");
  } catch (const Error&) {
    return spdlog::level::warn;
  }
  return spdlog::level::from_str(s);
}
}  // namespace

void log_init(int rank) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_rank = rank;
  if (!g_sink) g_sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  std::string pat = rank >= 0 ? fmt::format("[%H:%M:%S.%e] [r{}] [%n] [%l] %v", rank)
                              : std::string("[%H:%M:%S.%e] [%n] [%l] %v");
  g_sink->set_pattern(pat);
  auto lvl = env_level();
  spdlog::apply_all([&](std::shared_ptr<spdlog::logger> l) { l->set_level(lvl); });
  g_init = true;
}

std::shared_ptr<spdlog::logger> logger(const std::string& subsystem) {
  if (auto l = spdlog::get(subsystem)) return l;
  std::lock_guard<std::mutex> lk(g_mu);
  if (auto l = spdlog::get(subsystem)) return l;
  if (!g_sink) {
    g_sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
    g_sink->set_pattern("[%H:%M:%S.%e] [%n] [%l] %v");
  }
  auto l = std::make_shared<spdlog::logger>(subsystem, g_sink);
  l->set_level(env_level());
  spdlog::register_logger(l);
  return l;
}

}  // namespace atmoe
