// Environment knobs, declared once with default and doc (NCCL_PARAM style).
// `atmoe --help-env` prints the table.
#pragma once
#include <string>
#include <vector>

namespace atmoe {

struct EnvKnob {
  const char* name;
  const char* default_value;
  const char* doc;
};

const std::vector<EnvKnob>& env_knobs();
// Value of a declared knob (its default when unset). Throws for undeclared names.
std::string env_str(const char* name);
// Integer knob; a malformed value is an InputError naming the variable.
long env_int(const char* name);

}  // namespace atmoe
