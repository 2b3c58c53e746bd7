// Minimal GGUF v3 writer for tests: builds a byte image with metadata and tensors.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace atmoe::test {

class GgufBuilder {
 public:
  void kv_str(const std::string& k, const std::string& v);
  void kv_u32(const std::string& k, uint32_t v);
  void kv_f32(const std::string& k, float v);
  void kv_bool(const std::string& k, bool v);
  void kv_str_arr(const std::string& k, const std::vector<std::string>& v);
  void kv_i32_arr(const std::string& k, const std::vector<int32_t>& v);
  // ne in GGUF order (ne[0] fastest); data are the raw encoded bytes.
  void tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, std::vector<uint8_t> data);
  std::vector<uint8_t> build(uint32_t alignment = 32) const;
  void write(const std::string& path) const;

 private:
  struct T {
    std::string name;
    std::vector<uint64_t> ne;
    uint32_t type;
    std::vector<uint8_t> data;
  };
  std::vector<uint8_t> kvs_;
  uint64_t n_kv_ = 0;
  std::vector<T> ts_;
};

}  // namespace atmoe::test
