#include "common/safetensors.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_reader.h"

namespace atmoe {
using json = nlohmann::json;

static constexpr uint64_t kMaxHeader = 100ull << 20;  // 100 MiB, as the reference implementation

static bool parse_dtype(const std::string& s, DType* out) {
  if (s == "F32") *out = DType::F32;
  else if (s == "F16") *out = DType::F16;
  else if (s == "BF16") *out = DType::BF16;
  else if (s == "I32") *out = DType::I32;
  else if (s == "I64") *out = DType::I64;
  else if (s == "U8") *out = DType::U8;
  else return false;
  return true;
}

static const char* dtype_tag(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
  }
  return "?";
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  file_ = std::make_shared<MmapFile>(path);
  parse(file_->data(), file_->size());
}

SafetensorsFile::SafetensorsFile(const uint8_t* data, size_t size, const std::string& name)
    : path_(name) {
  parse(data, size);
}

void SafetensorsFile::parse(const uint8_t* data, size_t size) {
  base_ = data;
  ATMOE_CHECK_INPUT(size >= 8, "{}: truncated safetensors file: {} bytes, expected at least 8", path_, size);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  ATMOE_CHECK_INPUT(n <= kMaxHeader, "{}: safetensors header length {} exceeds the 100 MiB limit", path_, n);
  ATMOE_CHECK_INPUT(n <= size - 8, "{}: safetensors header length {} exceeds the file size {}", path_, n, size);
  const char* hb = reinterpret_cast<const char*>(data + 8);
  json h;
  std::string dup;
  try {
    h = parse_json_unique_keys(hb, hb + n, &dup);
  } catch (const json::exception& e) {
    ATMOE_INPUT_ERROR("{}: safetensors header is not valid JSON ({})", path_, e.what());
  }
  ATMOE_CHECK_INPUT(dup.empty(), "{}: safetensors header: key \"{}\" appears twice in one object", path_,
                    dup.substr(0, 80));
  ATMOE_CHECK_INPUT(h.is_object(), "{}: safetensors header must be a JSON object", path_);
  const size_t data_start = 8 + size_t(n);
  const size_t data_len = size - data_start;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      ATMOE_CHECK_INPUT(v.is_object(), "{}: __metadata__ must be an object of strings", path_);
      for (auto m = v.begin(); m != v.end(); ++m) {
        ATMOE_CHECK_INPUT(m.value().is_string(), "{}: __metadata__.{} must be a string", path_, m.key());
        meta_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    ATMOE_CHECK_INPUT(v.is_object(), "{}: tensor '{}': expected an object", path_, name);
    ATMOE_CHECK_INPUT(v.contains("dtype") && v["dtype"].is_string(), "{}: tensor '{}': missing string field 'dtype'", path_, name);
    ATMOE_CHECK_INPUT(v.contains("shape") && v["shape"].is_array(), "{}: tensor '{}': missing array field 'shape'", path_, name);
    ATMOE_CHECK_INPUT(v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2,
                      "{}: tensor '{}': 'data_offsets' must be [begin, end]", path_, name);
    SafetensorsEntry e;
    e.name = name;
    std::string dt = v["dtype"].get<std::string>();
    ATMOE_CHECK_INPUT(parse_dtype(dt, &e.dtype), "{}: tensor '{}': unsupported dtype '{}' (expected F32, F16, BF16, I32, I64 or U8)", path_, name, dt);
    ATMOE_CHECK_INPUT(v["shape"].size() <= 8, "{}: tensor '{}': {} dimensions, at most 8 supported", path_, name, v["shape"].size());
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      ATMOE_CHECK_INPUT(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                        "{}: tensor '{}': shape entries must be non-negative integers", path_, name);
      uint64_t dv = d.get<uint64_t>();
      ATMOE_CHECK_INPUT(dv < (1ull << 40), "{}: tensor '{}': dimension {} is too large", path_, name, dv);
      ATMOE_CHECK_INPUT(dv == 0 || numel <= (1ull << 48) / dv, "{}: tensor '{}': element count overflows", path_, name);
      numel *= dv;
      e.shape.push_back(int64_t(dv));
    }
    const json& off = v["data_offsets"];
    ATMOE_CHECK_INPUT(off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                      "{}: tensor '{}': data_offsets must be non-negative integers", path_, name);
    uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    ATMOE_CHECK_INPUT(b <= en && en <= data_len, "{}: tensor '{}': data_offsets [{}, {}] outside the data region of {} bytes",
                      path_, name, b, en, data_len);
    uint64_t want = numel * dtype_size(e.dtype);
    ATMOE_CHECK_INPUT(en - b == want, "{}: tensor '{}': data_offsets span {} bytes, shape {} x {} needs {}", path_, name,
                      en - b, shape_to_string(e.shape), dtype_name(e.dtype), want);
    e.begin = data_start + size_t(b);
    e.end = data_start + size_t(en);
    index_[name] = entries_.size();
    entries_.push_back(std::move(e));
  }
  // Tensors must not overlap.
  std::vector<const SafetensorsEntry*> sorted;
  for (auto& e : entries_) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < sorted.size(); ++i)
    ATMOE_CHECK_INPUT(sorted[i]->begin >= sorted[i - 1]->end || sorted[i - 1]->begin == sorted[i - 1]->end,
                      "{}: tensors '{}' and '{}' overlap", path_, sorted[i - 1]->name, sorted[i]->name);
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  ATMOE_CHECK_INPUT(it != index_.end(), "{}: tensor '{}' not found", path_, name);
  return entries_[it->second];
}

Tensor SafetensorsFile::get(const std::string& name) const {
  const auto& e = entry(name);
  return Tensor::view(e.dtype, e.shape, base_ + e.begin, file_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> r;
  for (auto& e : entries_) r.push_back(e.name);
  return r;
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsWriteItem>& items,
                       const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  size_t off = 0;
  for (const auto& it : items) {
    size_t n = 1;
    for (auto d : it.shape) n *= size_t(d);
    size_t bytes = n * dtype_size(it.dtype);
    h[it.name] = {{"dtype", dtype_tag(it.dtype)}, {"shape", it.shape}, {"data_offsets", {off, off + bytes}}};
    off += bytes;
  }
  std::string hs = h.dump();
  while ((8 + hs.size()) % 8) hs.push_back(' ');
  std::ofstream f(path, std::ios::binary);
  ATMOE_CHECK_INPUT(bool(f), "{}: cannot write", path);
  uint64_t n = hs.size();
  uint8_t le[8];
  for (int i = 0; i < 8; ++i) le[i] = uint8_t(n >> (8 * i));
  f.write(reinterpret_cast<const char*>(le), 8);
  f.write(hs.data(), std::streamsize(hs.size()));
  for (const auto& it : items) {
    size_t nn = 1;
    for (auto d : it.shape) nn *= size_t(d);
    f.write(static_cast<const char*>(it.data), std::streamsize(nn * dtype_size(it.dtype)));
  }
  ATMOE_CHECK_INPUT(bool(f), "{}: write failed", path);
}

}  // namespace atmoe
