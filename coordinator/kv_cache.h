// Per-sequence KV cache: for each layer, K and V as [capacity, n_kv_heads * head_dim]
// f32 rows (row p = position p), in the memory of the model's backend. Grows by doubling
// up to the model's context length (the rows written so far are copied over).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/backend.h"

namespace atmoe {

class KvCache {
 public:
  KvCache(Backend& be, int n_layers, int64_t kv_dim, int64_t max_ctx);
  // Ensures room for `n` positions in total; InputError past max_ctx.
  void reserve(int64_t n);
  float* k(int layer) { return k_[size_t(layer)].as<float>(); }
  float* v(int layer) { return v_[size_t(layer)].as<float>(); }
  int64_t len() const { return len_; }
  void set_len(int64_t n) { len_ = n; }
  int64_t max_ctx() const { return max_ctx_; }
  int64_t bytes() const;

 private:
  Backend* be_;
  int64_t kv_dim_, max_ctx_, cap_ = 0, len_ = 0;
  std::vector<Buffer> k_, v_;
};

}  // namespace atmoe
