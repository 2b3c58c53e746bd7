// ATMOE_NCCL_CHECK (CONVENTIONS.md 5): captures the expression, file and line and throws
// atmoe::RuntimeError with ncclGetErrorString. Host C++ only; needs nccl.h (CUDA builds
// find it with the toolkit) and libnccl at link time.
#pragma once
#include <nccl.h>

#include <string>

#include "common/error.h"

#define ATMOE_NCCL_CHECK(expr)                                                                                     \
  do {                                                                                                             \
    const ncclResult_t atmoe_r_ = (expr);                                                                          \
    if (atmoe_r_ != ncclSuccess)                                                                                   \
      ::atmoe::throw_runtime(__FILE__, __LINE__, std::string(#expr) + " failed: " + ncclGetErrorString(atmoe_r_)); \
  } while (0)
