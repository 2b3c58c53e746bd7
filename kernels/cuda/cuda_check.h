// Error macros for the CUDA runtime and cuBLAS (CONVENTIONS.md 5): each captures the
// expression, file and line and throws atmoe::RuntimeError (an atmoe::Error) with the
// library's own name and text of the failure. Host C++ only (backend code, tests); kernels
// return their launch status as int and the caller checks it with ATMOE_CUDA_LAUNCH.
// NCCL calls live in common/comm_nccl.cpp, with its own check macro (it throws CommError).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>

#include "common/error.h"

#define ATMOE_CUDA_CHECK(expr)                                                                                        \
  do {                                                                                                                \
    const cudaError_t atmoe_e_ = (expr);                                                                              \
    if (atmoe_e_ != cudaSuccess)                                                                                      \
      ::atmoe::throw_runtime(                                                                                         \
          __FILE__, __LINE__,                                                                                         \
          std::string(#expr) + " failed: " + cudaGetErrorName(atmoe_e_) + " (" + cudaGetErrorString(atmoe_e_) + ")"); \
  } while (0)

// A kernel launcher of kernels/cuda/*.cuh returns its cudaError_t as int.
#define ATMOE_CUDA_LAUNCH(expr) ATMOE_CUDA_CHECK(static_cast<cudaError_t>(expr))

#define ATMOE_CUBLAS_CHECK(expr)                                                                       \
  do {                                                                                                 \
    const cublasStatus_t atmoe_s_ = (expr);                                                            \
    if (atmoe_s_ != CUBLAS_STATUS_SUCCESS)                                                             \
      ::atmoe::throw_runtime(__FILE__, __LINE__,                                                       \
                             std::string(#expr) + " failed: " + cublasGetStatusName(atmoe_s_) + " (" + \
                                 cublasGetStatusString(atmoe_s_) + ")");                               \
  } while (0)
