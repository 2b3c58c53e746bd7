// safetensors, GGUF and config.json readers: correct values on good files, and on
// every truncation and on lying fields an InputError (never a crash, never a read
// outside the buffer: this suite also runs under ASan/UBSan in CI).
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "common/dtype.h"
#include "common/error.h"
#include "common/gguf.h"
#include "common/model_config.h"
#include "common/safetensors.h"
#include "common/tokenizer.h"
#include "common/utf8.h"
#include "coordinator/model.h"
#include "coordinator/synth_model.h"
#include "tests/unit/check.h"
#include "tests/unit/gguf_writer.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;

std::string tmpdir() {
  auto d = fs::temp_directory_path() / ("atmoe_test_formats_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d.string();
}

std::vector<uint8_t> read_all(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

TEST(Dtype, Bf16AndF16RoundTrip) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.5f)), 1.5f);
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);   // halfway 1 + 2^-8: ties to even (down)
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3f82);   // halfway 1 + 3*2^-8: ties to even (up)
  for (float v : {0.f, -0.f, 1.f, -2.5f, 65504.f, 6.103515625e-05f, 5.960464477539063e-08f})
    EXPECT_EQ(f16_to_f32(f32_to_f16(v)), v) << v;
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(NAN))));
}

TEST(Safetensors, ReadsWhatWasWritten) {
  std::string p = tmpdir() + "/a.safetensors";
  std::vector<float> a{1, 2, 3, 4, 5, 6};
  std::vector<uint16_t> b{f32_to_bf16(0.5f), f32_to_bf16(-3.f)};
  write_safetensors(p, {{"a", DType::F32, {2, 3}, a.data()}, {"b", DType::BF16, {2}, b.data()}}, {{"format", "pt"}});
  SafetensorsFile f(p);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  Tensor ta = f.get("a");
  ASSERT_EQ(ta.shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ta.data<float>()[5], 6.f);
  Tensor tb = f.get("b").to(DType::F32);
  EXPECT_EQ(tb.data<float>()[1], -3.f);
  EXPECT_THROW(f.get("missing"), InputError);
}

TEST(Safetensors, EveryTruncationIsAnInputError) {
  std::string p = tmpdir() + "/t.safetensors";
  std::vector<float> a(10, 1.f);
  write_safetensors(p, {{"a", DType::F32, {10}, a.data()}});
  auto bytes = read_all(p);
  for (size_t n = 0; n < bytes.size(); ++n)
    EXPECT_THROW(SafetensorsFile(bytes.data(), n, "trunc"), InputError) << "prefix " << n;
  EXPECT_NO_THROW(SafetensorsFile(bytes.data(), bytes.size(), "full"));
}

std::vector<uint8_t> st_with_header(const std::string& h, size_t data_bytes) {
  std::string s(8, '\0');
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char(n >> (8 * i));
  s += h;
  s.append(data_bytes, '\0');
  return std::vector<uint8_t>(s.begin(), s.end());
}

TEST(Safetensors, LyingHeadersAreInputErrors) {
  const char* bad[] = {
      R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}})",                      // span != shape
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}})",                    // past the end
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})",                      // begin > end
      R"({"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}})",                       // unknown dtype
      R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})",                     // negative dim
      R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",  // overflow
      R"({"a":{"dtype":"F32","shape":[2]}})",                                           // missing offsets
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      R"([1,2,3])",
      R"({"a":)",
      R"({"__metadata__":{"k":1}})",
      // a tensor given twice: the last would win silently, whatever the first said
      R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
      R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
  };
  for (const char* h : bad) EXPECT_THROW(SafetensorsFile(st_with_header(h, 16).data(), st_with_header(h, 16).size(), "bad"), InputError) << h;
  // Header length larger than the file.
  auto b = st_with_header("{}", 0);
  uint64_t huge = 1ull << 40;
  std::memcpy(b.data(), &huge, 8);
  EXPECT_THROW(SafetensorsFile(b.data(), b.size(), "huge"), InputError);
}

// Independent encoders for quantised blocks.
std::vector<uint8_t> enc_q8_0(const std::vector<float>& x) {
  std::vector<uint8_t> o;
  for (size_t b = 0; b < x.size() / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    float d = amax / 127.f;
    uint16_t dh = f32_to_f16(d);
    float dd = f16_to_f32(dh);
    o.push_back(uint8_t(dh));
    o.push_back(uint8_t(dh >> 8));
    for (int j = 0; j < 32; ++j) o.push_back(uint8_t(int8_t(dd ? std::lround(x[b * 32 + j] / dd) : 0)));
  }
  return o;
}

TEST(Gguf, DequantisesEachSupportedType) {
  std::mt19937_64 rng(test_seed() + 10);
  const uint64_t cols = 64, rows = 3, n = cols * rows;
  auto x = randn(n, rng);
  GgufBuilder g;
  g.kv_str("general.architecture", "llama");
  // F32 and F16 and BF16 raw.
  std::vector<uint8_t> f32(n * 4), f16(n * 2), bf16(n * 2);
  std::memcpy(f32.data(), x.data(), n * 4);
  for (size_t i = 0; i < n; ++i) {
    uint16_t h = f32_to_f16(x[i]), b = f32_to_bf16(x[i]);
    std::memcpy(&f16[2 * i], &h, 2);
    std::memcpy(&bf16[2 * i], &b, 2);
  }
  g.tensor("f32", {cols, rows}, 0, f32);
  g.tensor("f16", {cols, rows}, 1, f16);
  g.tensor("bf16", {cols, rows}, 30, bf16);
  g.tensor("q8_0", {cols, rows}, 8, enc_q8_0(x));
  // Q4_0 and Q4_1 with known nibbles: value j of a block is defined by (d, m, q).
  std::vector<uint8_t> q40, q41;
  std::vector<double> want40, want41;
  for (uint64_t b = 0; b < n / 32; ++b) {
    float d = 0.01f * float(b + 1), m = -0.3f + 0.1f * float(b);
    uint16_t dh = f32_to_f16(d), mh = f32_to_f16(m);
    for (uint8_t v : {uint8_t(dh), uint8_t(dh >> 8)}) q40.push_back(v);
    for (uint8_t v : {uint8_t(dh), uint8_t(dh >> 8), uint8_t(mh), uint8_t(mh >> 8)}) q41.push_back(v);
    std::vector<int> q(32);
    for (int j = 0; j < 32; ++j) q[size_t(j)] = int((b * 7 + uint64_t(j) * 5) % 16);
    for (int j = 0; j < 16; ++j) {
      uint8_t byte = uint8_t(q[size_t(j)] | (q[size_t(j + 16)] << 4));
      q40.push_back(byte);
      q41.push_back(byte);
    }
    for (int j = 0; j < 32; ++j) {
      want40.push_back(double(f16_to_f32(dh)) * (q[size_t(j)] - 8));
      want41.push_back(double(f16_to_f32(dh)) * q[size_t(j)] + double(f16_to_f32(mh)));
    }
  }
  g.tensor("q4_0", {cols, rows}, 2, q40);
  g.tensor("q4_1", {cols, rows}, 3, q41);
  auto img = g.build();
  GgufFile f(img.data(), img.size(), "mem");
  EXPECT_EQ(f.get_str("general.architecture"), "llama");
  auto t = f.load_f32("f32");
  ASSERT_EQ(t.shape(), (std::vector<int64_t>{int64_t(rows), int64_t(cols)}));
  EXPECT_TRUE(all_close(t.data<float>(), x.data(), n, kF32));
  EXPECT_TRUE(all_close(f.load_f32("f16").data<float>(), x.data(), n, {1e-3, 1e-3}));
  EXPECT_TRUE(all_close(f.load_f32("bf16").data<float>(), x.data(), n, {1e-2, 1e-2}));
  EXPECT_TRUE(all_close(f.load_f32("q8_0").data<float>(), x.data(), n, {0.03, 0.01}));
  auto a = f.load_f32("q4_0"), c = f.load_f32("q4_1");
  for (size_t i = 0; i < n; ++i) {
    EXPECT_NEAR(a.data<float>()[i], want40[i], 1e-6) << i;
    EXPECT_NEAR(c.data<float>()[i], want41[i], 1e-6) << i;
  }
}

TEST(Gguf, EveryTruncationAndLieIsAnInputError) {
  GgufBuilder g;
  g.kv_str("general.architecture", "llama");
  g.kv_str_arr("tokenizer.ggml.tokens", {"a", "b", "c"});
  g.tensor("w", {32, 2}, 0, std::vector<uint8_t>(256, 0));
  auto img = g.build();
  for (size_t n = 0; n < img.size(); ++n) EXPECT_THROW(GgufFile(img.data(), n, "trunc"), InputError) << n;
  EXPECT_NO_THROW(GgufFile(img.data(), img.size(), "ok"));
  // Flip each of the first 200 bytes to 0xff: must parse or fail with InputError, never crash.
  for (size_t i = 0; i < std::min<size_t>(img.size(), 200); ++i) {
    auto bad = img;
    bad[i] = 0xff;
    try {
      GgufFile f(bad.data(), bad.size(), "flip");
    } catch (const InputError&) {
    }
  }
  GgufBuilder q;  // Q4_1 row not a whole number of blocks
  q.tensor("w", {33, 1}, 3, std::vector<uint8_t>(40, 0));
  auto qi = q.build();
  EXPECT_THROW(GgufFile(qi.data(), qi.size(), "blocks"), InputError);
  GgufBuilder k;  // K-quants are not supported: named in the error
  k.tensor("w", {256, 1}, 14, std::vector<uint8_t>(210, 0));
  auto ki = k.build();
  try {
    GgufFile(ki.data(), ki.size(), "kq");
    FAIL() << "Q6_K accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("Q6_K"), std::string::npos) << e.what();
  }
}

// The InputError text of f() ("" when it does not throw); one line, naming what was asked.
std::string input_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}
#define EXPECT_REFUSED(expr, ...)                                                                \
  do {                                                                                           \
    const std::string err_ = input_error([&] { (void)(expr); });                                 \
    EXPECT_FALSE(err_.empty()) << "accepted: " #expr;                                            \
    for (const char* want_ : {__VA_ARGS__}) EXPECT_NE(err_.find(want_), std::string::npos) << err_; \
    EXPECT_EQ(err_.find('\n'), std::string::npos) << err_;                                       \
  } while (0)

// A tiny llama GGUF (metadata only; head_dim 16) with every standard key except those in
// `skip`, so that a test can add its own value for one of them.
GgufBuilder llama_gguf(std::initializer_list<const char*> skip = {}) {
  GgufBuilder g;
  auto want = [&](const char* k) {
    for (const char* s : skip)
      if (std::string(s) == k) return false;
    return true;
  };
  g.kv_str("general.architecture", "llama");
  const std::pair<const char*, uint32_t> ints[] = {
      {"llama.block_count", 2},       {"llama.context_length", 512},        {"llama.embedding_length", 64},
      {"llama.feed_forward_length", 96}, {"llama.attention.head_count", 4}, {"llama.attention.head_count_kv", 2},
      {"llama.vocab_size", 256}};
  for (const auto& [k, v] : ints)
    if (want(k)) g.kv_u32(k, v);
  if (want("llama.rope.freq_base")) g.kv_f32("llama.rope.freq_base", 10000.f);
  if (want("llama.attention.layer_norm_rms_epsilon")) g.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  return g;
}

ModelConfig gguf_config(const GgufBuilder& g) {
  auto img = g.build();
  GgufFile f(img.data(), img.size(), "m.gguf");
  return config_from_gguf(f);
}

TEST(Gguf, IntegerKeysAreRangeCheckedNotClamped) {
  EXPECT_EQ(gguf_config(llama_gguf()).max_position, 512);
  auto g = llama_gguf({"llama.context_length"});
  g.kv_u32("llama.context_length", 0xffffffffu);  // was clamped to 2^30
  EXPECT_REFUSED(gguf_config(g), "m.gguf", "llama.context_length", "4294967295", "1..1073741824");
  auto h = llama_gguf({"llama.block_count"});
  h.kv_u32("llama.block_count", 5000);
  EXPECT_REFUSED(gguf_config(h), "llama.block_count", "1..1024");
}

TEST(Gguf, DuplicateKeysAreRefused) {
  auto g = llama_gguf();
  g.kv_u32("llama.block_count", 3);
  EXPECT_REFUSED(gguf_config(g), "m.gguf", "llama.block_count", "twice");
}

TEST(Gguf, RopeAndEpsilonMustBeFinitePositive) {
  for (const char* k : {"llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"}) {
    for (float bad : {NAN, 0.f, -1.f}) {
      auto g = llama_gguf({k});
      g.kv_f32(k, bad);
      EXPECT_REFUSED(gguf_config(g), k, "finite number > 0");
    }
  }
  auto g = llama_gguf();
  g.kv_str("llama.rope.scaling.type", "linear");
  g.kv_f32("llama.rope.scaling.factor", NAN);
  EXPECT_REFUSED(gguf_config(g), "llama.rope.scaling.factor");
  auto ok = llama_gguf();
  ok.kv_str("llama.rope.scaling.type", "linear");
  ok.kv_f32("llama.rope.scaling.factor", 4.f);
  EXPECT_EQ(gguf_config(ok).rope_scaling.factor, 4.0);
}

TEST(Gguf, RopeDimensionCountMustEqualHeadDim) {
  auto ok = llama_gguf();
  ok.kv_u32("llama.rope.dimension_count", 16);
  EXPECT_EQ(gguf_config(ok).head_dim, 16);
  auto g = llama_gguf();
  g.kv_u32("llama.rope.dimension_count", 8);  // partial rotary: not what we compute
  EXPECT_REFUSED(gguf_config(g), "llama.rope.dimension_count", "16");
}

TEST(Gguf, MisalignedTensorOffsetIsRefused) {
  GgufBuilder g;
  g.tensor("a", {8}, 0, std::vector<uint8_t>(32, 0));
  g.tensor("b", {8}, 0, std::vector<uint8_t>(32, 0));
  auto img = g.build();
  EXPECT_NO_THROW(GgufFile(img.data(), img.size(), "ok"));
  // Tensor infos: name "b" (u64 len + 1 byte) | n_dims u32 | ne u64 | type u32 | offset u64.
  const uint8_t name_b[] = {1, 0, 0, 0, 0, 0, 0, 0, 'b'};
  auto it = std::search(img.begin(), img.end(), std::begin(name_b), std::end(name_b));
  ASSERT_NE(it, img.end());
  const size_t off_at = size_t(it - img.begin()) + 9 + 4 + 8 + 4;
  uint64_t off;
  std::memcpy(&off, &img[off_at], 8);
  ASSERT_EQ(off, 32u);
  off = 4;  // inside the data section, but not on general.alignment
  std::memcpy(&img[off_at], &off, 8);
  EXPECT_REFUSED(GgufFile(img.data(), img.size(), "mis.gguf"), "mis.gguf", "'b'", "general.alignment");
}

// Two tensors' byte ranges must not overlap: an offset pointed into another tensor, or a type
// whose rows are longer than the data laid out for it, would read other weights as its own.
TEST(Gguf, OverlappingTensorsAreRefused) {
  GgufBuilder g;
  g.tensor("a", {8}, 0, std::vector<uint8_t>(32, 0));  // F32: 32 bytes at 0
  g.tensor("b", {8}, 0, std::vector<uint8_t>(32, 0));  // at 32
  auto img = g.build();
  const uint8_t name_b[] = {1, 0, 0, 0, 0, 0, 0, 0, 'b'}, name_a[] = {1, 0, 0, 0, 0, 0, 0, 0, 'a'};
  auto ib = std::search(img.begin(), img.end(), std::begin(name_b), std::end(name_b));
  auto ia = std::search(img.begin(), img.end(), std::begin(name_a), std::end(name_a));
  ASSERT_NE(ib, img.end());
  ASSERT_NE(ia, img.end());
  // b's offset onto a's bytes.
  auto alias = img;
  const uint64_t zero = 0;
  std::memcpy(&alias[size_t(ib - img.begin()) + 9 + 4 + 8 + 4], &zero, 8);
  EXPECT_REFUSED(GgufFile(alias.data(), alias.size(), "alias.gguf"), "alias.gguf", "'a'", "'b'", "overlap");
  // a widened to 16 elements (64 bytes): its range runs into b's.
  auto wide = img;
  const uint64_t ne16 = 16;
  std::memcpy(&wide[size_t(ia - img.begin()) + 9 + 4], &ne16, 8);
  EXPECT_REFUSED(GgufFile(wide.data(), wide.size(), "wide.gguf"), "wide.gguf", "overlap");
}

// GPT-2 byte-to-unicode alphabet: the 256 single-byte tokens of a byte-level vocabulary.
std::vector<std::string> byte_tokens() {
  std::vector<std::string> t(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    utf8_append(t[size_t(b)], keep ? uint32_t(b) : uint32_t(256 + n++));
  }
  return t;
}

GgufBuilder tokenizer_gguf() {
  GgufBuilder g;
  auto toks = byte_tokens();
  toks.push_back("<|end|>");
  g.kv_str("tokenizer.ggml.model", "gpt2");
  g.kv_str_arr("tokenizer.ggml.tokens", toks);
  std::vector<int32_t> types(256, 1);
  types.push_back(3);
  g.kv_i32_arr("tokenizer.ggml.token_type", types);
  g.kv_str_arr("tokenizer.ggml.merges", {});
  return g;
}

Tokenizer gguf_tokenizer(const GgufBuilder& g) {
  auto img = g.build();
  GgufFile f(img.data(), img.size(), "tok.gguf");
  return Tokenizer::from_gguf(f);
}

TEST(Gguf, TokenizerIdsOutsideTheVocabularyAreRefused) {
  auto ok = tokenizer_gguf();
  ok.kv_u32("tokenizer.ggml.eot_token_id", 256);
  EXPECT_TRUE(gguf_tokenizer(ok).is_eog(256));
  for (const char* k : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                        "tokenizer.ggml.unknown_token_id"}) {
    auto g = tokenizer_gguf();
    g.kv_u32(k, 257);
    EXPECT_REFUSED(gguf_tokenizer(g), "tok.gguf", k, "0..256");
  }
  // Ids atmoe does not read (padding, sep, ...) are tolerated out of range, as llama.cpp does.
  auto pad = tokenizer_gguf();
  pad.kv_u32("tokenizer.ggml.padding_token_id", 257);
  EXPECT_EQ(gguf_tokenizer(pad).vocab_size(), 257);
  GgufBuilder bad;  // a merge naming tokens absent from the vocabulary
  bad.kv_str("tokenizer.ggml.model", "gpt2");
  bad.kv_str_arr("tokenizer.ggml.tokens", byte_tokens());
  bad.kv_str_arr("tokenizer.ggml.merges", {"a b"});  // "ab" is not a token
  EXPECT_REFUSED(gguf_tokenizer(bad), "tokenizer.ggml.merges[0]", "'ab'");
}

// ---- config.json

std::string write_config(const std::string& name, const nlohmann::json& extra, const std::string& arch = "llama") {
  nlohmann::json c = {{"model_type", arch},         {"hidden_size", 64},  {"intermediate_size", 128},
                      {"num_hidden_layers", 2},     {"num_attention_heads", 4}, {"vocab_size", 100},
                      {"max_position_embeddings", 4096}};
  c.update(extra);
  const std::string p = tmpdir() + "/" + name + ".json";
  std::ofstream(p) << c.dump();
  return p;
}

TEST(Config, RefusesWhatTheModelDoesNotImplement) {
  using J = nlohmann::json;
  EXPECT_NO_THROW(config_from_hf_json(write_config("act_ok", {{"hidden_act", "silu"}, {"mlp_bias", false}})));
  EXPECT_REFUSED(config_from_hf_json(write_config("act", {{"hidden_act", "gelu"}})), "act.json", "hidden_act", "gelu");
  EXPECT_REFUSED(config_from_hf_json(write_config("act5", {{"hidden_act", 5}})), "hidden_act", "string");
  EXPECT_REFUSED(config_from_hf_json(write_config("mlpb", {{"mlp_bias", true}})), "mlp_bias");
  EXPECT_REFUSED(config_from_hf_json(write_config("rs_str", {{"rope_scaling", "linear"}})), "rope_scaling", "object");
  const J l3 = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                {"original_max_position_embeddings", 8192}};
  EXPECT_NO_THROW(config_from_hf_json(write_config("l3", {{"rope_scaling", l3}})));
  for (const char* k : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
    J r = l3;
    r.erase(k);
    const std::string field = std::string("rope_scaling.") + k;
    EXPECT_REFUSED(config_from_hf_json(write_config("l3_missing", {{"rope_scaling", r}})), field.c_str(), "missing");
  }
  J z = l3;
  z["factor"] = 0;
  EXPECT_REFUSED(config_from_hf_json(write_config("l3_zero", {{"rope_scaling", z}})), "rope_scaling.factor");
}

TEST(Config, SlidingWindowFollowsTheArchitecture) {
  // Qwen2 uses its window only with use_sliding_window: true (HF's default is false);
  // Mistral unless it is false; Llama never.
  EXPECT_EQ(config_from_hf_json(write_config("q0", {{"sliding_window", 512}}, "qwen2")).max_position, 4096);
  EXPECT_EQ(config_from_hf_json(write_config("q1", {{"sliding_window", 512}, {"use_sliding_window", true}}, "qwen2")).max_position, 512);
  EXPECT_EQ(config_from_hf_json(write_config("m0", {{"sliding_window", 512}}, "mistral")).max_position, 512);
  EXPECT_EQ(config_from_hf_json(write_config("m1", {{"sliding_window", 512}, {"use_sliding_window", false}}, "mistral")).max_position, 4096);
  EXPECT_EQ(config_from_hf_json(write_config("m2", {{"sliding_window", nullptr}}, "mistral")).max_position, 4096);
  EXPECT_EQ(config_from_hf_json(write_config("l0", {{"sliding_window", 512}})).max_position, 4096);
  EXPECT_REFUSED(config_from_hf_json(write_config("sw_str", {{"sliding_window", "x"}}, "mistral")), "sliding_window");
  EXPECT_REFUSED(config_from_hf_json(write_config("sw_0", {{"sliding_window", 0}}, "mistral")), "sliding_window");
  EXPECT_REFUSED(config_from_hf_json(write_config("usw", {{"use_sliding_window", "yes"}}, "qwen2")), "use_sliding_window");
}

// A synth HF model whose tensors are rewritten by `edit` into the given shard files
// (name -> shard; "" = a single model.safetensors) plus an optional index.
std::string synth_with_tensors(const std::string& name,
                               const std::function<std::string(const std::string&)>& shard_of,
                               const std::vector<std::pair<std::string, std::string>>& extra_in_shard,
                               const nlohmann::json& index) {
  const std::string d = tmpdir() + "/" + name;
  fs::remove_all(d);
  SynthModelOptions o;
  o.out = d;
  o.seed = 5;
  synth_model(o);
  std::map<std::string, Tensor> ts;
  {
    SafetensorsFile st(d + "/model.safetensors");
    for (const auto& n : st.names()) ts.emplace(n, st.get(n).to(DType::F32));
  }
  const Tensor& any = ts.begin()->second;
  std::map<std::string, std::vector<SafetensorsWriteItem>> shards;
  for (const auto& [n, t] : ts) shards[shard_of(n)].push_back({n, DType::F32, t.shape(), t.data<float>()});
  for (const auto& [n, sh] : extra_in_shard) shards[sh].push_back({n, DType::F32, any.shape(), any.data<float>()});
  fs::remove(d + "/model.safetensors");
  for (const auto& [sh, items] : shards) write_safetensors(d + "/" + (sh.empty() ? "model.safetensors" : sh), items);
  if (!index.is_null()) std::ofstream(d + "/model.safetensors.index.json") << index.dump();
  return d;
}

TEST(Config, EveryCheckpointTensorIsUsed) {
  auto single = [](const std::string&) { return std::string(); };
  EXPECT_NO_THROW(Model::load(synth_with_tensors("inv", single, {{"model.layers.0.self_attn.rotary_emb.inv_freq", ""}}, nullptr),
                              DType::F32));
  EXPECT_REFUSED(Model::load(synth_with_tensors("foo", single, {{"foo.bar", ""}}, nullptr), DType::F32), "model.safetensors",
                 "'foo.bar'", "not used");
  EXPECT_REFUSED(Model::load(synth_with_tensors("l9", single, {{"model.layers.9.mlp.up_proj.weight", ""}}, nullptr), DType::F32),
                 "'model.layers.9.mlp.up_proj.weight'");
  EXPECT_REFUSED(Model::load(synth_with_tensors("qb", single, {{"model.layers.0.self_attn.q_proj.bias", ""}}, nullptr), DType::F32),
                 "'model.layers.0.self_attn.q_proj.bias'");
}

TEST(Config, ShardIndexMustMatchTheShards) {
  auto two = [](const std::string& n) { return std::string(n < "model.layers.1" ? "a.safetensors" : "b.safetensors"); };
  auto index_of = [&](const std::string& name) {
    nlohmann::json wm = nlohmann::json::object();
    SynthModelOptions o;
    o.out = tmpdir() + "/" + name + "_names";
    o.seed = 5;
    synth_model(o);
    SafetensorsFile st(o.out + "/model.safetensors");
    for (const auto& n : st.names()) wm[n] = two(n);
    return nlohmann::json{{"metadata", nlohmann::json::object()}, {"weight_map", wm}};
  };
  const auto idx = index_of("idx");
  EXPECT_NO_THROW(Model::load(synth_with_tensors("sh_ok", two, {}, idx), DType::F32));
  // model.norm.weight also in shard a (the index says b).
  EXPECT_REFUSED(Model::load(synth_with_tensors("sh_dup", two, {{"model.norm.weight", "a.safetensors"}}, idx), DType::F32),
                 "model.safetensors.index.json", "model.norm.weight", "two shards");
  // The index points model.norm.weight at shard a, which lacks it.
  auto wrong = idx;
  wrong["weight_map"]["model.norm.weight"] = "a.safetensors";
  EXPECT_REFUSED(Model::load(synth_with_tensors("sh_wrong", two, {}, wrong), DType::F32), "weight_map.model.norm.weight");
}

TEST(Config, HfConfigFieldsAndErrors) {
  std::string d = tmpdir();
  auto write = [&](const std::string& s) {
    std::ofstream(d + "/config.json") << s;
    return d + "/config.json";
  };
  auto c = config_from_hf_json(write(R"({"model_type":"llama","hidden_size":576,"intermediate_size":1536,
    "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,"rms_norm_eps":1e-5,
    "rope_theta":100000,"tie_word_embeddings":true,"max_position_embeddings":8192})"));
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_TRUE(c.tie_embeddings);
  EXPECT_EQ(c.rope_style, RopeStyle::Neox);
  auto q = config_from_hf_json(write(R"({"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
    "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100})"));
  EXPECT_TRUE(q.qkv_bias);
  auto l3 = config_from_hf_json(write(R"({"model_type":"llama","hidden_size":64,"intermediate_size":128,
    "num_hidden_layers":2,"num_attention_heads":2,"vocab_size":100,"rope_theta":500000,
    "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
    "original_max_position_embeddings":8192}})"));
  auto inv = rope_inv_freq(l3);
  // Independent llama3 check: the highest frequency is untouched, the lowest divided by 8.
  EXPECT_NEAR(inv[0], 1.0, 1e-7);
  EXPECT_NEAR(inv.back(), std::pow(500000.0, -2.0 * 15 / 32) / 8.0, 1e-9);
  EXPECT_THROW(config_from_hf_json(write(R"({"model_type":"gpt2","hidden_size":64})")), InputError);
  EXPECT_THROW(config_from_hf_json(write(R"({"model_type":"llama","hidden_size":64,"intermediate_size":128,
    "num_hidden_layers":2,"num_attention_heads":3,"num_key_value_heads":2,"vocab_size":100})")), InputError);
  EXPECT_THROW(config_from_hf_json(write(R"({"model_type":"llama",)")), InputError);
  EXPECT_THROW(config_from_hf_json(write(R"({"model_type":"llama","hidden_size":"big"})")), InputError);
  EXPECT_THROW(config_from_hf_json(d + "/nope.json"), InputError);
}

}  // namespace
}  // namespace atmoe::test
