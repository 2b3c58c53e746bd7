// safetensors, GGUF and config.json readers: correct values on good files, and on
// every truncation and on lying fields an InputError (never a crash, never a read
// outside the buffer: this suite also runs under ASan/UBSan in CI).
#include <cstring>
#include <filesystem>
#include <fstream>

#include "common/dtype.h"
#include "common/error.h"
#include "common/gguf.h"
#include "common/model_config.h"
#include "common/safetensors.h"
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
      R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}})",           // span != shape
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}})",         // past the end
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})",           // begin > end
      R"({"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}})",            // unknown dtype
      R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})",          // negative dim
      R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",  // overflow
      R"({"a":{"dtype":"F32","shape":[2]}})",                                // missing offsets
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      R"([1,2,3])", R"({"a":)", R"({"__metadata__":{"k":1}})",
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
