#include "tests/unit/gguf_writer.h"

#include <cstring>
#include <fstream>

namespace atmoe::test {
namespace {
template <class T>
void put(std::vector<uint8_t>& b, T v) {
  uint8_t tmp[sizeof(T)];
  std::memcpy(tmp, &v, sizeof(T));
  for (uint8_t c : tmp) b.push_back(c);
}
void put_str(std::vector<uint8_t>& b, const std::string& s) {
  put<uint64_t>(b, s.size());
  for (char c : s) b.push_back(uint8_t(c));
}
}  // namespace

void GgufBuilder::kv_str(const std::string& k, const std::string& v) {
  put_str(kvs_, k);
  put<uint32_t>(kvs_, 8);
  put_str(kvs_, v);
  ++n_kv_;
}
void GgufBuilder::kv_u32(const std::string& k, uint32_t v) {
  put_str(kvs_, k);
  put<uint32_t>(kvs_, 4);
  put<uint32_t>(kvs_, v);
  ++n_kv_;
}
void GgufBuilder::kv_f32(const std::string& k, float v) {
  put_str(kvs_, k);
  put<uint32_t>(kvs_, 6);
  put<float>(kvs_, v);
  ++n_kv_;
}
void GgufBuilder::kv_bool(const std::string& k, bool v) {
  put_str(kvs_, k);
  put<uint32_t>(kvs_, 7);
  put<uint8_t>(kvs_, v ? 1 : 0);
  ++n_kv_;
}
void GgufBuilder::kv_str_arr(const std::string& k, const std::vector<std::string>& v) {
  put_str(kvs_, k);
  put<uint32_t>(kvs_, 9);
  put<uint32_t>(kvs_, 8);
  put<uint64_t>(kvs_, v.size());
  for (auto& s : v) put_str(kvs_, s);
  ++n_kv_;
}
void GgufBuilder::kv_i32_arr(const std::string& k, const std::vector<int32_t>& v) {
  put_str(kvs_, k);
  put<uint32_t>(kvs_, 9);
  put<uint32_t>(kvs_, 5);
  put<uint64_t>(kvs_, v.size());
  for (auto x : v) put<int32_t>(kvs_, x);
  ++n_kv_;
}
void GgufBuilder::tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, std::vector<uint8_t> data) {
  ts_.push_back({name, std::move(ne), type, std::move(data)});
}

std::vector<uint8_t> GgufBuilder::build(uint32_t alignment) const {
  std::vector<uint8_t> b;
  for (char c : std::string("GGUF")) b.push_back(uint8_t(c));
  put<uint32_t>(b, 3);
  put<uint64_t>(b, ts_.size());
  put<uint64_t>(b, n_kv_);
  b.insert(b.end(), kvs_.begin(), kvs_.end());
  uint64_t off = 0;
  std::vector<uint64_t> offs;
  for (auto& t : ts_) {
    put_str(b, t.name);
    put<uint32_t>(b, uint32_t(t.ne.size()));
    for (auto n : t.ne) put<uint64_t>(b, n);
    put<uint32_t>(b, t.type);
    put<uint64_t>(b, off);
    offs.push_back(off);
    off += (t.data.size() + alignment - 1) / alignment * alignment;
  }
  while (b.size() % alignment) b.push_back(0);
  size_t base = b.size();
  for (size_t i = 0; i < ts_.size(); ++i) {
    b.resize(base + offs[i]);
    b.insert(b.end(), ts_[i].data.begin(), ts_[i].data.end());
  }
  return b;
}

void GgufBuilder::write(const std::string& path) const {
  auto b = build();
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

}  // namespace atmoe::test
