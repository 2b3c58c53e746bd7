#include "common/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/dtype.h"
#include "common/error.h"

namespace atmoe {

const char* ggml_type_name(uint32_t t) {
  switch (t) {
    case 0: return "F32"; case 1: return "F16"; case 2: return "Q4_0"; case 3: return "Q4_1";
    case 6: return "Q5_0"; case 7: return "Q5_1"; case 8: return "Q8_0"; case 9: return "Q8_1";
    case 10: return "Q2_K"; case 11: return "Q3_K"; case 12: return "Q4_K"; case 13: return "Q5_K";
    case 14: return "Q6_K"; case 15: return "Q8_K"; case 30: return "BF16";
    default: return "unknown";
  }
}

// Block layouts (ggml-common.h):
//   Q8_0: 32 elems, 34 B = f16 d | int8 q[32];               x = d*q
//   Q4_0: 32 elems, 18 B = f16 d | u8 qs[16];                x[j] = d*((qs[j]&15)-8), x[j+16] = d*((qs[j]>>4)-8)
//   Q4_1: 32 elems, 20 B = f16 d | f16 m | u8 qs[16];        x[j] = d*(qs[j]&15)+m,   x[j+16] = d*(qs[j]>>4)+m
bool ggml_row_bytes(uint32_t type, uint64_t n, uint64_t* bytes) {
  uint64_t blk, bb;
  switch (type) {
    case 0: blk = 1; bb = 4; break;
    case 1: case 30: blk = 1; bb = 2; break;
    case 2: blk = 32; bb = 18; break;
    case 3: blk = 32; bb = 20; break;
    case 8: blk = 32; bb = 34; break;
    default: return false;
  }
  if (n % blk) return false;
  *bytes = n / blk * bb;
  return true;
}

void ggml_dequantize(uint32_t type, const uint8_t* src, float* dst, size_t n) {
  auto h = [](const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return f16_to_f32(v); };
  switch (type) {
    case 0: std::memcpy(dst, src, n * 4); return;
    case 1: for (size_t i = 0; i < n; ++i) dst[i] = h(src + 2 * i); return;
    case 30: for (size_t i = 0; i < n; ++i) { uint16_t v; std::memcpy(&v, src + 2 * i, 2); dst[i] = bf16_to_f32(v); } return;
    case 8:
      for (size_t b = 0; b < n / 32; ++b) {
        const uint8_t* p = src + b * 34;
        float d = h(p);
        for (int j = 0; j < 32; ++j) dst[b * 32 + j] = d * float(int8_t(p[2 + j]));
      }
      return;
    case 2:
      for (size_t b = 0; b < n / 32; ++b) {
        const uint8_t* p = src + b * 18;
        float d = h(p);
        for (int j = 0; j < 16; ++j) {
          dst[b * 32 + j] = d * float(int(p[2 + j] & 15) - 8);
          dst[b * 32 + j + 16] = d * float(int(p[2 + j] >> 4) - 8);
        }
      }
      return;
    case 3:
      for (size_t b = 0; b < n / 32; ++b) {
        const uint8_t* p = src + b * 20;
        float d = h(p), m = h(p + 2);
        for (int j = 0; j < 16; ++j) {
          dst[b * 32 + j] = d * float(p[4 + j] & 15) + m;
          dst[b * 32 + j + 16] = d * float(p[4 + j] >> 4) + m;
        }
      }
      return;
    default: throw RuntimeError(fmt::format("ggml_dequantize: unsupported type {}", type));
  }
}

namespace {
// Bounded little-endian cursor over the file; every read is checked.
struct Cursor {
  const uint8_t* p;
  size_t size, pos = 0;
  const std::string& path;
  void need(size_t n, const char* what) {
    ATMOE_CHECK_INPUT(n <= size - pos, "{}: truncated GGUF: {} needs {} bytes at offset {}, file has {}", path, what, n, pos, size);
  }
  template <class T> T rd(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string str(const char* what) {
    uint64_t n = rd<uint64_t>(what);
    ATMOE_CHECK_INPUT(n <= (1u << 24), "{}: GGUF {} string length {} is implausible (max 16 MiB)", path, what, n);
    need(size_t(n), what);
    std::string s(reinterpret_cast<const char*>(p + pos), size_t(n));
    pos += size_t(n);
    return s;
  }
};

GgufValue read_value(Cursor& c, uint32_t type, const std::string& key, int depth) {
  GgufValue v;
  v.gtype = type;
  switch (type) {
    case 0: v.kind = GgufValue::UINT; v.u = c.rd<uint8_t>(key.c_str()); break;
    case 1: v.kind = GgufValue::INT; v.i = c.rd<int8_t>(key.c_str()); break;
    case 2: v.kind = GgufValue::UINT; v.u = c.rd<uint16_t>(key.c_str()); break;
    case 3: v.kind = GgufValue::INT; v.i = c.rd<int16_t>(key.c_str()); break;
    case 4: v.kind = GgufValue::UINT; v.u = c.rd<uint32_t>(key.c_str()); break;
    case 5: v.kind = GgufValue::INT; v.i = c.rd<int32_t>(key.c_str()); break;
    case 6: v.kind = GgufValue::FLOAT; v.f = c.rd<float>(key.c_str()); break;
    case 7: v.kind = GgufValue::BOOL; v.b = c.rd<uint8_t>(key.c_str()) != 0; break;
    case 8: v.kind = GgufValue::STRING; v.s = c.str(key.c_str()); break;
    case 9: {
      ATMOE_CHECK_INPUT(depth < 2, "{}: GGUF key '{}': nested arrays deeper than 2 are not supported", c.path, key);
      v.kind = GgufValue::ARRAY;
      uint32_t et = c.rd<uint32_t>(key.c_str());
      uint64_t n = c.rd<uint64_t>(key.c_str());
      // Every element takes at least one byte: a count larger than what is left is a lie.
      ATMOE_CHECK_INPUT(n <= c.size - c.pos, "{}: GGUF key '{}': array of {} elements exceeds the file size", c.path, key, n);
      v.arr.reserve(size_t(n));
      for (uint64_t i = 0; i < n; ++i) v.arr.push_back(read_value(c, et, key, depth + 1));
      break;
    }
    case 10: v.kind = GgufValue::UINT; v.u = c.rd<uint64_t>(key.c_str()); break;
    case 11: v.kind = GgufValue::INT; v.i = c.rd<int64_t>(key.c_str()); break;
    case 12: v.kind = GgufValue::FLOAT; v.f = c.rd<double>(key.c_str()); break;
    default: ATMOE_INPUT_ERROR("{}: GGUF key '{}': unknown value type {}", c.path, key, type);
  }
  if (v.kind == GgufValue::INT) v.u = uint64_t(v.i);
  if (v.kind == GgufValue::UINT) v.i = int64_t(v.u);
  return v;
}
}  // namespace

GgufFile::GgufFile(const std::string& path) : path_(path) {
  file_ = std::make_shared<MmapFile>(path);
  data_ = file_->data();
  size_ = file_->size();
  parse();
}

GgufFile::GgufFile(const uint8_t* data, size_t size, const std::string& name)
    : path_(name), data_(data), size_(size) {
  parse();
}

void GgufFile::parse() {
  Cursor c{data_, size_, 0, path_};
  c.need(4, "magic");
  ATMOE_CHECK_INPUT(std::memcmp(data_, "GGUF", 4) == 0, "{}: not a GGUF file (bad magic)", path_);
  c.pos = 4;
  version_ = c.rd<uint32_t>("version");
  ATMOE_CHECK_INPUT(version_ == 2 || version_ == 3, "{}: GGUF version {} unsupported (expected 2 or 3)", path_, version_);
  uint64_t n_tensors = c.rd<uint64_t>("tensor count");
  uint64_t n_kv = c.rd<uint64_t>("kv count");
  // Each kv needs >= 12 bytes and each tensor info >= 24 bytes.
  ATMOE_CHECK_INPUT(n_kv <= size_ / 12, "{}: GGUF kv count {} exceeds what the file can hold", path_, n_kv);
  ATMOE_CHECK_INPUT(n_tensors <= size_ / 24, "{}: GGUF tensor count {} exceeds what the file can hold", path_, n_tensors);
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.str("kv key");
    uint32_t type = c.rd<uint32_t>("kv type");
    // Two values for one key: which one a reader takes is arbitrary, so neither is trusted.
    ATMOE_CHECK_INPUT(!kv_.count(key), "{}: GGUF key '{}' appears twice in the metadata", path_, key);
    kv_[key] = read_value(c, type, key, 0);
  }
  uint64_t alignment = 32;
  if (auto* a = find("general.alignment")) {
    ATMOE_CHECK_INPUT(a->kind == GgufValue::UINT && a->u > 0 && a->u <= 65536 && (a->u & (a->u - 1)) == 0,
                      "{}: general.alignment must be a power of two <= 65536", path_);
    alignment = a->u;
  }
  alignment_ = alignment;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = c.str("tensor name");
    uint32_t nd = c.rd<uint32_t>("tensor n_dims");
    ATMOE_CHECK_INPUT(nd >= 1 && nd <= 4, "{}: tensor '{}': n_dims {} (expected 1..4)", path_, t.name, nd);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      uint64_t ne = c.rd<uint64_t>("tensor dim");
      ATMOE_CHECK_INPUT(ne > 0 && ne < (1ull << 40), "{}: tensor '{}': dimension {} out of range", path_, t.name, ne);
      ATMOE_CHECK_INPUT(numel <= (1ull << 48) / ne, "{}: tensor '{}': element count overflows", path_, t.name);
      numel *= ne;
      t.ne.push_back(int64_t(ne));
    }
    t.type = c.rd<uint32_t>("tensor type");
    t.offset = c.rd<uint64_t>("tensor offset");
    ATMOE_CHECK_INPUT(t.offset % alignment == 0, "{}: tensor '{}': data offset {} is not a multiple of general.alignment {}",
                      path_, t.name, t.offset, alignment);
    uint64_t bytes = 0;
    ATMOE_CHECK_INPUT(ggml_row_bytes(t.type, uint64_t(t.ne[0]), &bytes),
                      "{}: tensor '{}': type {} ({}) unsupported or row of {} not a whole number of blocks "
                      "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                      path_, t.name, t.type, ggml_type_name(t.type), t.ne[0]);
    t.nbytes = size_t(bytes * (numel / uint64_t(t.ne[0])));
    ATMOE_CHECK_INPUT(!tindex_.count(t.name), "{}: duplicate tensor '{}'", path_, t.name);
    tindex_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }
  data_offset_ = (c.pos + alignment - 1) / alignment * alignment;
  ATMOE_CHECK_INPUT(data_offset_ <= size_, "{}: truncated GGUF: data section starts past the end of the file", path_);
  size_t avail = size_ - data_offset_;
  for (const auto& t : tensors_) {
    ATMOE_CHECK_INPUT(t.offset <= avail && t.nbytes <= avail - t.offset,
                      "{}: tensor '{}': data [{}, +{}) lies outside the file (data section holds {} bytes)", path_,
                      t.name, t.offset, t.nbytes, avail);
  }
  // Tensors must not overlap (a changed type or offset would otherwise read another tensor's
  // bytes as its own).
  std::vector<const GgufTensorInfo*> sorted;
  for (const auto& t : tensors_) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < sorted.size(); ++i)
    ATMOE_CHECK_INPUT(sorted[i]->offset >= sorted[i - 1]->offset + sorted[i - 1]->nbytes,
                      "{}: tensors '{}' [{}, +{}) and '{}' [{}, +{}) overlap", path_, sorted[i - 1]->name,
                      sorted[i - 1]->offset, sorted[i - 1]->nbytes, sorted[i]->name, sorted[i]->offset,
                      sorted[i]->nbytes);
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_.find(key);
  return it == kv_.end() ? nullptr : &it->second;
}

std::string GgufFile::get_str(const std::string& key) const {
  auto* v = find(key);
  ATMOE_CHECK_INPUT(v && v->kind == GgufValue::STRING, "{}: GGUF key '{}' missing or not a string", path_, key);
  return v->s;
}
uint64_t GgufFile::get_uint(const std::string& key) const {
  auto* v = find(key);
  ATMOE_CHECK_INPUT(v && (v->kind == GgufValue::UINT || (v->kind == GgufValue::INT && v->i >= 0)),
                    "{}: GGUF key '{}' missing or not a non-negative integer", path_, key);
  return v->u;
}
int64_t GgufFile::get_int(const std::string& key, int64_t lo, int64_t hi) const {
  auto* v = find(key);
  ATMOE_CHECK_INPUT(v && (v->kind == GgufValue::UINT || v->kind == GgufValue::INT),
                    "{}: GGUF key '{}' missing or not an integer (expected {}..{})", path_, key, lo, hi);
  const bool ok = v->kind == GgufValue::UINT ? (hi >= 0 && v->u <= uint64_t(hi) && (lo <= 0 || v->u >= uint64_t(lo)))
                                             : (v->i >= lo && v->i <= hi);
  if (!ok) {
    if (v->kind == GgufValue::UINT) ATMOE_INPUT_ERROR("{}: GGUF key '{}' = {} out of range (expected {}..{})", path_, key, v->u, lo, hi);
    ATMOE_INPUT_ERROR("{}: GGUF key '{}' = {} out of range (expected {}..{})", path_, key, v->i, lo, hi);
  }
  return v->kind == GgufValue::UINT ? int64_t(v->u) : v->i;
}
double GgufFile::get_positive(const std::string& key) const {
  const double x = get_float(key);
  ATMOE_CHECK_INPUT(std::isfinite(x) && x > 0, "{}: GGUF key '{}' = {}: expected a finite number > 0", path_, key, x);
  return x;
}
double GgufFile::get_float(const std::string& key) const {
  auto* v = find(key);
  ATMOE_CHECK_INPUT(v && (v->kind == GgufValue::FLOAT || v->kind == GgufValue::UINT || v->kind == GgufValue::INT),
                    "{}: GGUF key '{}' missing or not a number", path_, key);
  return v->kind == GgufValue::FLOAT ? v->f : v->kind == GgufValue::INT ? double(v->i) : double(v->u);
}
bool GgufFile::get_bool(const std::string& key, bool def) const {
  auto* v = find(key);
  if (!v) return def;
  ATMOE_CHECK_INPUT(v->kind == GgufValue::BOOL, "{}: GGUF key '{}' is not a bool", path_, key);
  return v->b;
}
const std::vector<GgufValue>& GgufFile::get_arr(const std::string& key) const {
  auto* v = find(key);
  ATMOE_CHECK_INPUT(v && v->kind == GgufValue::ARRAY, "{}: GGUF key '{}' missing or not an array", path_, key);
  return v->arr;
}

const GgufTensorInfo* GgufFile::tensor(const std::string& name) const {
  auto it = tindex_.find(name);
  return it == tindex_.end() ? nullptr : &tensors_[it->second];
}

Tensor GgufFile::load_f32(const std::string& name) const {
  const auto* t = tensor(name);
  ATMOE_CHECK_INPUT(t, "{}: tensor '{}' not found", path_, name);
  std::vector<int64_t> shape(t->ne.rbegin(), t->ne.rend());
  Tensor out = Tensor::empty(DType::F32, shape);
  ggml_dequantize(t->type, tensor_data(*t), out.data<float>(), size_t(out.numel()));
  return out;
}

}  // namespace atmoe
