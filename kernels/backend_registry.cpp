// The backends this build has. The one place that knows whether CUDA was compiled in
// (ggml-backend-reg.cpp does the same); callers ask by name.
#include <stdexcept>

#include "common/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/backend_cpu.h"
#include "kernels/thread_pool.h"
#ifdef ATMOE_HAVE_CUDA
#include "kernels/cuda/backend_cuda.h"
#include "kernels/cuda/device.cuh"
#endif

namespace atmoe {

std::vector<std::string> backend_names() {
#ifdef ATMOE_HAVE_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

// "cuda" or "cuda:N" -> N (0 when absent); -1 when `name` is not a CUDA name.
static int cuda_index(const std::string& name) {
  if (name == "cuda") return 0;
  if (name.rfind("cuda:", 0) != 0 || name.size() == 5) return -1;
  int d = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || d > 1000) return -1;
    d = d * 10 + (name[i] - '0');
  }
  return d;
}

bool backend_available(const std::string& name, std::string* why) {
  if (name == "cpu") return true;
  const int dev = cuda_index(name);
  if (dev < 0) {
    if (why) *why = "unknown backend '" + name + "' (known: cpu, cuda, cuda:N)";
    return false;
  }
#ifdef ATMOE_HAVE_CUDA
  std::string reason;
  const int n = cuda::device_count(&reason);
  if (dev >= n) {
    if (why)
      *why = n == 0 ? "no CUDA device: " + reason
                    : "no CUDA device " + std::to_string(dev) + " (" + std::to_string(n) + " found)";
    return false;
  }
  return true;
#else
  if (why) *why = "this build of atmoe has no CUDA backend (configure with -DATMOE_ENABLE_CUDA=ON)";
  return false;
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& name, ThreadPool* pool) {
  if (name == "cpu") return make_cpu_backend(pool);
  std::string why;
  if (cuda_index(name) < 0) ATMOE_INPUT_ERROR("--device: unknown backend '{}' (expected cpu, cuda or cuda:N)", name);
  if (!backend_available(name, &why)) ATMOE_INPUT_ERROR("--device {}: {}", name, why);
#ifdef ATMOE_HAVE_CUDA
  return make_cuda_backend(cuda_index(name));
#else
  ATMOE_INPUT_ERROR("--device {}: {}", name, why);
#endif
}

Backend& cpu_backend() {
  static std::unique_ptr<Backend> be = make_cpu_backend(&ThreadPool::global());
  return *be;
}

}  // namespace atmoe
