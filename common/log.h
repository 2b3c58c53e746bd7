// One named spdlog logger per subsystem (coord, worker, comm, kernel, http, model, fit),
// level from ATMOE_LOG_LEVEL, rank in the pattern. Logs go to stderr; stdout carries
// only program output (generated text, JSON).
#pragma once
#include <memory>
#include <string>

#include <spdlog/spdlog.h>

namespace atmoe {

// Creates the loggers once; rank < 0 means "not under MPI".
void log_init(int rank = -1);
std::shared_ptr<spdlog::logger> logger(const std::string& subsystem);

}  // namespace atmoe

#define ATMOE_LOG(sub) ::atmoe::logger(sub)
