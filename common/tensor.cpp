#include "common/tensor.h"

#include <cstdlib>
#include <cstring>

#include "common/error.h"

namespace atmoe {

static std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> st(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}

std::string shape_to_string(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (auto d : shape_) n *= d;
  return n;
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_); }

Tensor Tensor::empty(DType dt, std::vector<int64_t> shape) {
  Tensor t;
  t.dtype_ = dt;
  t.shape_ = std::move(shape);
  for (auto d : t.shape_) ATMOE_ASSERT(d >= 0);
  t.strides_ = contiguous_strides(t.shape_);
  size_t bytes = (t.nbytes() + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) throw RuntimeError("out of memory allocating tensor " + shape_to_string(t.shape_));
  std::memset(p, 0, bytes ? bytes : 64);
  t.owned_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.data_ = p;
  return t;
}

Tensor Tensor::view(DType dt, std::vector<int64_t> shape, const void* data,
                    std::shared_ptr<const void> owner) {
  Tensor t;
  t.dtype_ = dt;
  t.shape_ = std::move(shape);
  t.strides_ = contiguous_strides(t.shape_);
  t.data_ = const_cast<void*>(data);
  t.owner_ = std::move(owner);
  return t;
}

Tensor Tensor::to(DType dt) const {
  ATMOE_ASSERT(is_contiguous());
  Tensor out = empty(dt, shape_);
  size_t n = size_t(numel());
  if (dt == dtype_) {
    std::memcpy(out.data_, data_, nbytes());
  } else if (dt == DType::F32) {
    convert_to_f32(dtype_, data_, out.data<float>(), n);
  } else {
    std::vector<float> tmp(n);
    convert_to_f32(dtype_, data_, tmp.data(), n);
    uint16_t* o = out.data<uint16_t>();
    if (dt == DType::BF16) f32_to_bf16_n(tmp.data(), o, n);
    else if (dt == DType::F16) for (size_t i = 0; i < n; ++i) o[i] = f32_to_f16(tmp[i]);
    else throw RuntimeError("Tensor::to: unsupported target dtype");
  }
  return out;
}

std::string Tensor::shape_str() const { return shape_to_string(shape_); }

}  // namespace atmoe
