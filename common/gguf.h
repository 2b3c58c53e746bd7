// GGUF v2/v3 reader (mmap). Layout (little-endian):
//   "GGUF" | u32 version | u64 n_tensors | u64 n_kv
//   n_kv × { string key | u32 type | value }          string = u64 len | bytes
//   n_tensors × { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
//   padding to general.alignment (default 32) | tensor data (offsets relative to here)
// ne[0] is the fastest-varying dimension (a row), so a [rows, cols] matrix has ne = {cols, rows}.
// Every count, length and offset is checked against the file size before use.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "common/mmap_file.h"
#include "common/tensor.h"

namespace atmoe {

enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};
const char* ggml_type_name(uint32_t t);

struct GgufValue {
  enum Kind { UINT, INT, FLOAT, BOOL, STRING, ARRAY } kind = UINT;
  uint32_t gtype = 0;  // the GGUF value type it was stored as
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0;
  bool b = false;
  std::string s;
  std::vector<GgufValue> arr;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // GGUF order: ne[0] fastest
  uint32_t type = 0;
  uint64_t offset = 0;      // relative to the data section
  size_t nbytes = 0;
};

class GgufFile {
 public:
  explicit GgufFile(const std::string& path);
  GgufFile(const uint8_t* data, size_t size, const std::string& name);

  uint32_t version() const { return version_; }
  bool has(const std::string& key) const { return kv_.count(key) != 0; }
  const GgufValue* find(const std::string& key) const;
  // Typed getters: InputError naming the key when absent or of the wrong kind.
  std::string get_str(const std::string& key) const;
  uint64_t get_uint(const std::string& key) const;
  // An integer key range-checked before narrowing: InputError naming the key and lo..hi.
  int64_t get_int(const std::string& key, int64_t lo, int64_t hi) const;
  double get_float(const std::string& key) const;
  // A finite number > 0 (frequency bases, epsilons, scale factors).
  double get_positive(const std::string& key) const;
  bool get_bool(const std::string& key, bool def) const;
  const std::vector<GgufValue>& get_arr(const std::string& key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* tensor(const std::string& name) const;
  const uint8_t* tensor_data(const GgufTensorInfo& t) const { return data_ + data_offset_ + t.offset; }
  // Dequantise to an owned f32 tensor with row-major shape (ne reversed).
  Tensor load_f32(const std::string& name) const;
  const std::map<std::string, GgufValue>& kv() const { return kv_; }
  uint64_t alignment() const { return alignment_; }
  const std::string& path() const { return path_; }

 private:
  void parse();
  std::string path_;
  std::shared_ptr<MmapFile> file_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  uint32_t version_ = 0;
  size_t data_offset_ = 0;
  uint64_t alignment_ = 32;
  std::map<std::string, GgufValue> kv_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tindex_;
};

// Bytes for n elements of a ggml type; false when the type is unsupported or n is not a
// whole number of blocks.
bool ggml_row_bytes(uint32_t type, uint64_t n, uint64_t* bytes);
// Dequantise n elements (n a multiple of the block size) of `type` to f32.
void ggml_dequantize(uint32_t type, const uint8_t* src, float* dst, size_t n);

}  // namespace atmoe
