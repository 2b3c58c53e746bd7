// safetensors reader: mmap, zero-copy tensor views.
// Layout: u64 little-endian N | N bytes of JSON header | data region.
// Header: {"name": {"dtype": "F32"|"F16"|"BF16"|..., "shape": [..],
//          "data_offsets": [begin, end]}, "__metadata__": {str: str}}
// Offsets are relative to the data region. Every field is checked: header length
// within the file, offsets within the data region, end-begin == numel * dtype size,
// no overflow, no overlapping tensors.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/mmap_file.h"
#include "common/tensor.h"

namespace atmoe {

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;  // absolute file offsets
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // InputError on any malformed field
  // Parse from memory (fuzzing, tests); `name` is used in messages.
  SafetensorsFile(const uint8_t* data, size_t size, const std::string& name);

  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;
  Tensor get(const std::string& name) const;  // zero-copy view
  std::vector<std::string> names() const;
  const std::map<std::string, std::string>& metadata() const { return meta_; }
  const std::string& path() const { return path_; }

 private:
  void parse(const uint8_t* data, size_t size);
  std::string path_;
  std::shared_ptr<MmapFile> file_;
  const uint8_t* base_ = nullptr;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> meta_;
};

// Writer for tests and synth-model (f32/bf16/f16 tensors, written in the given order).
struct SafetensorsWriteItem {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
};
void write_safetensors(const std::string& path, const std::vector<SafetensorsWriteItem>& items,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace atmoe
