#include "common/error.h"

namespace atmoe {

void throw_input(const std::string& msg) { throw InputError(msg); }

void throw_runtime(const char* file, int line, const std::string& msg) {
  throw RuntimeError(fmt::format("{} ({}:{})", msg, file, line));
}

}  // namespace atmoe
