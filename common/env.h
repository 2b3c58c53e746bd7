// Environment knobs, declared once with default, doc and the values they accept
// (NCCL_PARAM style). `atmoe --help-env` prints the table; env_check_all() refuses a bad
// value of any of them before a command does any work.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace atmoe {

struct EnvKnob {
  const char* name;
  const char* default_value;
  const char* doc;
  const char* choices = nullptr;  // "a|b|c": one of these (or the default); nullptr: free text or integer
  bool integer = false;           // an integer in [lo, hi]
  int64_t lo = 0, hi = 0;
};

const std::vector<EnvKnob>& env_knobs();
// Value of a declared knob (its default when unset), checked against its declaration:
// InputError naming the variable and what it accepts. Throws RuntimeError for undeclared names.
std::string env_str(const char* name);
int64_t env_int(const char* name);
// Checks every declared knob that is set.
void env_check_all();

}  // namespace atmoe
