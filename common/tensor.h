// Tensor: dtype + shape/stride over storage that is either owned (64-byte aligned heap)
// or a view into someone else's memory (an mmap'd file, kept alive by `owner`).
// Shapes are row-major: shape[0] is the slowest dimension; strides are in elements.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace atmoe {

class Tensor {
 public:
  Tensor() = default;
  // Owning, zero-initialised.
  static Tensor empty(DType dt, std::vector<int64_t> shape);
  // Non-owning view; `owner` keeps the backing storage (e.g. an MmapFile) alive.
  static Tensor view(DType dt, std::vector<int64_t> shape, const void* data,
                     std::shared_ptr<const void> owner);

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }
  int64_t dim(int i) const { return shape_.at(size_t(i)); }
  int ndim() const { return int(shape_.size()); }
  int64_t numel() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const;
  bool defined() const { return data_ != nullptr || numel() == 0; }
  bool owns() const { return owned_ != nullptr; }

  template <class T> T* data() { return static_cast<T*>(data_); }
  template <class T> const T* data() const { return static_cast<const T*>(data_); }
  const void* raw() const { return data_; }

  // Contiguous copy converted to `dt` (f32/f16/bf16 only).
  Tensor to(DType dt) const;
  std::string shape_str() const;

 private:
  DType dtype_ = DType::F32;
  std::vector<int64_t> shape_, strides_;
  void* data_ = nullptr;
  std::shared_ptr<void> owned_;
  std::shared_ptr<const void> owner_;
};

std::string shape_to_string(const std::vector<int64_t>& s);

}  // namespace atmoe
