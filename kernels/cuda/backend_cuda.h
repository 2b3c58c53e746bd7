// The CUDA backend (kernels/backend.h): ops of kernels/ops.h enqueued on one non-blocking
// stream of one device. Plain C++ header: callers never include a CUDA header.
#pragma once
#include <memory>

#include "kernels/backend.h"

namespace atmoe {

// A new CUDA execution context on `device` (its own stream, cuBLAS handle and pinned
// staging buffers). Throws atmoe::Error when the device cannot be used (no driver, no GPU,
// index out of range, a failing CUDA call), with the reason.
std::unique_ptr<Backend> make_cuda_backend(int device);

}  // namespace atmoe
