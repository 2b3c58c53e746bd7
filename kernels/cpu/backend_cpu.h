// The CPU backend (kernels/cpu/ behind kernels/backend.h); callers get it through
// make_backend("cpu") or cpu_backend().
#pragma once
#include <memory>

#include "kernels/backend.h"

namespace atmoe {

// An execution context on `pool` (ThreadPool::global() when nullptr).
std::unique_ptr<Backend> make_cpu_backend(ThreadPool* pool = nullptr);

}  // namespace atmoe
