// Typed errors. Every failure that a user can cause (bad file, bad flag, bad request)
// is an InputError: main turns it into one line on stderr and exit code 2. Internal
// invariant violations are RuntimeError (exit code 1).
#pragma once
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace atmoe {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  virtual int exit_code() const { return 1; }
};

// Bad input: a file, a flag or a request that does not meet its contract.
class InputError : public Error {
 public:
  using Error::Error;
  int exit_code() const override { return 2; }
};

// A broken invariant or a failed system call inside atmoe.
class RuntimeError : public Error {
 public:
  using Error::Error;
};

[[noreturn]] void throw_input(const std::string& msg);
[[noreturn]] void throw_runtime(const char* file, int line, const std::string& msg);

}  // namespace atmoe

// Input errors name the file/field and what was expected.
#define ATMOE_INPUT_ERROR(...) ::atmoe::throw_input(fmt::format(__VA_ARGS__))
#define ATMOE_CHECK_INPUT(cond, ...) \
  do {                               \
    if (!(cond)) ATMOE_INPUT_ERROR(__VA_ARGS__); \
  } while (0)
// Internal invariants: captures the expression, file and line.
#define ATMOE_ASSERT(cond)                                                      \
  do {                                                                          \
    if (!(cond)) ::atmoe::throw_runtime(__FILE__, __LINE__, "assertion failed: " #cond); \
  } while (0)
