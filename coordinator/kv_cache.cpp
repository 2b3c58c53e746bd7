#include "coordinator/kv_cache.h"

#include <algorithm>

#include "common/error.h"

namespace atmoe {

KvCache::KvCache(Backend& be, int n_layers, int64_t kv_dim, int64_t max_ctx)
    : be_(&be), kv_dim_(kv_dim), max_ctx_(max_ctx), k_(size_t(n_layers)), v_(size_t(n_layers)) {}

void KvCache::reserve(int64_t n) {
  ATMOE_CHECK_INPUT(n <= max_ctx_, "sequence of {} tokens exceeds the model's context length {}", n, max_ctx_);
  if (n <= cap_) return;
  const int64_t cap = std::min(max_ctx_, std::max<int64_t>(n, std::max<int64_t>(64, cap_ * 2)));
  const size_t keep = size_t(len_ * kv_dim_) * 4, bytes = size_t(cap * kv_dim_) * 4;
  for (auto* bufs : {&k_, &v_})
    for (auto& b : *bufs) {
      Buffer nb(*be_, bytes);
      if (keep) be_->copy(nb.get(), b.get(), keep);
      b = std::move(nb);
    }
  cap_ = cap;
}

int64_t KvCache::bytes() const {
  return int64_t(k_.size()) * 2 * cap_ * kv_dim_ * 4;
}

}  // namespace atmoe
