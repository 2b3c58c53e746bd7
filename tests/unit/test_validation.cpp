// Bad input is refused with one InputError that names the file and field: typed JSON
// reads (JsonAt), closed bundle schemas, files that are not what they claim (FIFOs,
// directories, symlink loops), environment knobs, and non-finite weights.
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/bundle.h"
#include "common/dtype.h"
#include "common/env.h"
#include "common/error.h"
#include "common/files.h"
#include "common/json_reader.h"
#include "common/tensor_check.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "(accepted)";
}

#define EXPECT_ERROR_HAS(expr, needle)                                   \
  do {                                                                   \
    const std::string _e = error_of([&] { (void)(expr); });              \
    EXPECT_NE(_e.find(needle), std::string::npos) << "error: " << _e;    \
  } while (0)

std::string tmp_dir(const std::string& name) {
  std::string d = (fs::temp_directory_path() / ("atmoe_val_" + name + "_" + std::to_string(::getpid()))).string();
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

TEST(Validation, JsonIntegersAreRangeCheckedBeforeNarrowing) {
  const json j = json::parse(R"({"a": 4294967297, "b": 1e30, "c": -1, "d": 18446744073709551615, "e": 7, "f": 2.5,
                                "g": "7", "h": true, "o": {"x": [1, "two"]}})");
  const JsonAt r(j, "f.json");
  EXPECT_ERROR_HAS(r["a"].integer(0, INT32_MAX), "f.json: a: expected an integer in 0..2147483647, got 4294967297");
  EXPECT_ERROR_HAS(r["b"].integer(0, 10), "b: expected an integer in 0..10, got the number 1e+30");
  EXPECT_ERROR_HAS(r["c"].integer(0, 10), "got -1");
  EXPECT_ERROR_HAS(r["d"].integer(0, INT64_MAX), "got 18446744073709551615");
  EXPECT_EQ(r["e"].integer(0, 10), 7);
  EXPECT_ERROR_HAS(r["e"].integer(8, 10), "expected an integer in 8..10, got 7");  // the lower bound of a non-negative value
  EXPECT_ERROR_HAS(r["f"].integer(0, 10), "expected an integer");
  EXPECT_ERROR_HAS(r["g"].integer(0, 10), "got the string \"7\"");
  EXPECT_ERROR_HAS(r["h"].str(), "h: expected a string, got true");
  EXPECT_ERROR_HAS(r["o"]["x"].at(1).integer(0, 9), "f.json: o.x[1]: expected an integer");
  EXPECT_ERROR_HAS(r["missing"].str(), "f.json: missing: missing field");
  EXPECT_ERROR_HAS(r["o"].only_keys({"y"}), "o.x: unknown field (expected one of: y)");
  EXPECT_EQ(r.int_or("absent", 5, 0, 9), 5);
  EXPECT_ERROR_HAS(r["f"].number(0, 2), "expected a number in [0, 2], got 2.5");
  // A container of the wrong type is described, never dumped (dump() recurses: a deeply
  // nested file must give an InputError, not a stack overflow).
  std::string deep(200000, '['), close(200000, ']');
  const json d = json::parse(deep + close);
  EXPECT_ERROR_HAS(JsonAt(d, "d.json").object(), "d.json: expected an object, got a list");
}

TEST(Validation, FilesThatAreNotRegularAreRefusedBeforeOpening) {
  const std::string d = tmp_dir("files");
  const std::string fifo = d + "/fifo", loop = d + "/loop", file = d + "/f.json";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  fs::create_symlink(d + "/loop2", loop);
  fs::create_symlink(loop, d + "/loop2");
  std::ofstream(file) << "{\"a\": 1}";
  EXPECT_ERROR_HAS(read_file(fifo, "prompt"), "is a FIFO, expected a regular file");  // must not block
  EXPECT_ERROR_HAS(read_json_file(d, "config"), "is a directory, expected a file");
  EXPECT_ERROR_HAS(read_file(loop, "prompt"), "symlink loop");
  EXPECT_ERROR_HAS(read_file(d + "/nope", "prompt"), "not found");
  EXPECT_ERROR_HAS(read_file(file + "/x", "prompt"), "not a directory");
  EXPECT_ERROR_HAS(read_file(file, "prompt", 3), "more than the 3 bytes allowed");
  // procfs reports a size of 0: the text is read to its end, and bounded there too.
  const std::string status = read_file("/proc/self/status", "prompt");
  EXPECT_NE(status.find("Name:"), std::string::npos) << status.size() << " bytes";
  EXPECT_ERROR_HAS(read_file("/proc/self/status", "prompt", 16), "more than the 16 bytes allowed");
  EXPECT_EQ(read_json_file(file, "config")["a"], 1);
  std::ofstream(d + "/dup.json") << R"({"a": {"lambda": 0.2, "x": {"lambda": 1}, "lambda": 0.9}})";
  EXPECT_ERROR_HAS(read_json_file(d + "/dup.json", "config"), "dup.json: key \"lambda\" appears twice in one object");
  std::ofstream(d + "/nodup.json") << R"({"a": {"k": 1}, "b": {"k": 2}, "k": [{"k": 1}, {"k": 2}]})";
  EXPECT_EQ(read_json_file(d + "/nodup.json", "config")["b"]["k"], 2);
  EXPECT_ERROR_HAS(require_writable_file(d, "--trace"), "is a directory");
  EXPECT_ERROR_HAS(require_writable_file(d + "/no/such/dir/t.json", "--trace"), "does not exist");
  EXPECT_ERROR_HAS(require_writable_file(fifo, "--trace"), "FIFO");
  require_writable_file(d + "/new.json", "--trace");
  write_file(d + "/new.json", "x", "--trace");
  EXPECT_EQ(read_file(d + "/new.json", "t"), "x");
  EXPECT_ERROR_HAS(prepare_output_dir(d, false, "--out"), "not empty");
  prepare_output_dir(d, true, "--out");
  EXPECT_ERROR_HAS(prepare_output_dir(file, true, "--out"), "not a directory");
}

TEST(Validation, NonFiniteTensorsNameTheTensorAndIndex) {
  std::mt19937_64 rng(test_seed() + 41);
  for (DType dt : {DType::F32, DType::F16, DType::BF16})
    for (float bad : {NAN, INFINITY, -INFINITY}) {
      const int64_t n = 1 + int64_t(rng() % 3000), at = int64_t(rng() % uint64_t(n));
      Tensor t = Tensor::empty(dt, {n});
      for (int64_t i = 0; i < n; ++i) {
        const float v = i == at ? bad : float(i % 7) - 3.f;
        if (dt == DType::F32) t.data<float>()[i] = v;
        else t.data<uint16_t>()[i] = dt == DType::F16 ? f32_to_f16(v) : f32_to_bf16(v);
      }
      const std::string what = std::isnan(bad) ? "NaN" : (bad > 0 ? "+Inf" : "-Inf");
      EXPECT_ERROR_HAS(check_finite(t, "w.safetensors", "x.weight"),
                       "w.safetensors: tensor 'x.weight' holds " + what + " at index " + std::to_string(at));
    }
  Tensor ok = Tensor::empty(DType::F32, {5});
  check_finite(ok, "w", "ok");
  // Views into a mapped file may start at any byte: an unaligned F32/BF16 view is read safely.
  std::vector<uint8_t> raw(4 * 9 + 1, 0);
  const float inf = INFINITY;
  std::memcpy(raw.data() + 1 + 4 * 7, &inf, 4);
  EXPECT_ERROR_HAS(check_finite(Tensor::view(DType::F32, {9}, raw.data() + 1, nullptr), "u", "t"), "+Inf at index 7");
  EXPECT_ERROR_HAS(check_finite(Tensor::view(DType::BF16, {18}, raw.data() + 1, nullptr), "u", "t"), "+Inf at index 15");
  Tensor A = Tensor::empty(DType::F32, {2, 8}), B = Tensor::empty(DType::F32, {4, 2});
  for (int i = 0; i < 16; ++i) A.data<float>()[i] = 1.f;
  for (int i = 0; i < 8; ++i) B.data<float>()[i] = 1e17f;
  check_lora_bound(1.0, A, B, "a", "m");  // 1 · 2 · 1e17 · 1 · 8 = 1.6e18: its square fits in f32
  EXPECT_ERROR_HAS(check_lora_bound(100.0, A, B, "a", "m"), "a: m: scale 100 x rank 2");  // 1.6e20: does not
  EXPECT_ERROR_HAS(check_lora_bound(NAN, A, B, "a", "m"), "not finite");
}

TEST(Validation, EnvironmentKnobsAreCheckedAgainstTheirDeclaration) {
  struct Case {
    const char *name, *value, *needle;
  } cases[] = {{"ATMOE_THREADS", "-1", "ATMOE_THREADS='-1': expected an integer in 0..1024"},
               {"ATMOE_THREADS", "100000000000", "expected an integer"},
               {"ATMOE_THREADS", "abc", "expected an integer"},
               {"ATMOE_THREADS", "", "expected an integer"},
               {"ATMOE_SPIN_US", "-3", "ATMOE_SPIN_US"},
               {"ATMOE_FORCE_ISA", "sse9", "expected one of scalar|avx2|avx512"},
               {"ATMOE_GEMV_PREFETCH", "1", "ATMOE_GEMV_PREFETCH='1': expected one of auto|on|off"},
               {"ATMOE_LOG_LEVEL", "bogus", "ATMOE_LOG_LEVEL='bogus'"},
               {"ATMOE_PREFILL_GEMM", "gpu", "expected one of simd|blas"}};
  for (const auto& c : cases) {
    const char* old = std::getenv(c.name);
    const std::string saved = old ? old : "";
    ::setenv(c.name, c.value, 1);
    EXPECT_ERROR_HAS(env_check_all(), c.needle);
    if (old) ::setenv(c.name, saved.c_str(), 1);
    else ::unsetenv(c.name);
  }
  ::setenv("ATMOE_SPIN_US", "50", 1);
  EXPECT_EQ(env_int("ATMOE_SPIN_US"), 50);
  ::unsetenv("ATMOE_SPIN_US");
  EXPECT_EQ(env_int("ATMOE_SPIN_US"), 200);
}

// A minimal at-moe manifest around `edit`; the adapters need not exist (the manifest is read alone).
std::string manifest_error(const std::function<void(json&)>& edit) {
  static int n = 0;
  const std::string d = tmp_dir("bundle" + std::to_string(n++));
  std::ofstream(d + "/base.gguf") << "x";
  json j = {{"format", "atmoe-bundle"}, {"version", 1}, {"base_model", "base.gguf"}, {"method", "at-moe"},
            {"groups", {{{"name", "med"}, {"experts", {{{"name", "cardio"}, {"adapter", "e/cardio"}}}}},
                        {{"name", "law"}, {"experts", {{{"name", "tax"}, {"adapter", "e/tax"}}}}}}},
            {"router", {{"file", "router.safetensors"}}}};
  edit(j);
  std::ofstream(d + "/atmoe.json") << j.dump();
  return error_of([&] { load_bundle_manifest(d); });
}

TEST(Validation, BundleManifestSchemaIsClosedAndTyped) {
  EXPECT_EQ(manifest_error([](json&) {}), "(accepted)");
  auto has = [](const std::string& e, const std::string& needle) {
    EXPECT_NE(e.find(needle), std::string::npos) << e;
  };
  has(manifest_error([](json& j) { j["lamda"] = 0.5; }), "atmoe.json: lamda: unknown field");
  has(manifest_error([](json& j) { j["router"]["tau"] = 1; }), "router.tau: unknown field");
  has(manifest_error([](json& j) { j["groups"][0]["weight"] = 1; }), "groups[0].weight: unknown field");
  has(manifest_error([](json& j) { j["groups"][0]["experts"][0]["rank"] = 1; }), "groups[0].experts[0].rank: unknown field");
  has(manifest_error([](json& j) { j["format"] = 1; }), "format: expected a string, got the number 1");
  has(manifest_error([](json& j) { j["router"]["input"] = 1; }), "router.input: expected a string");
  has(manifest_error([](json& j) { j["version"] = 4294967297ull; }), "version: expected an integer in 0..2147483647");
  has(manifest_error([](json& j) { j["version"] = "1"; }), "version: expected an integer");
  has(manifest_error([](json& j) { j["version"] = 2; }), "version 2 is not supported");
  has(manifest_error([](json& j) { j["lambda"] = "0.5"; }), "lambda: expected a number in [0, 1]");
  has(manifest_error([](json& j) { j["lambda"] = 1.5; }), "lambda: expected a number in [0, 1], got 1.5");
  has(manifest_error([](json& j) { j["groups"] = json::object(); }), "groups: expected a non-empty list of groups");
  has(manifest_error([](json& j) { j["lambda"] = 0.5; }), "lambda: weighs the mixture against general_expert, and there is none");
  has(manifest_error([](json& j) { j["general_expert"] = {{"name", "gen"}, {"adapter", "e/gen"}}; }), "general_expert: needs 'lambda'");
  has(manifest_error([](json& j) { j["groups"][0]["experts"] = {1}; }), "groups[0].experts[0]: expected an object");
  has(manifest_error([](json& j) { j["groups"][0]["experts"][0]["name"] = "law"; }), "expert 'law' has the name of a group");
  has(manifest_error([](json& j) { j["groups"][0]["experts"][0]["name"] = "a,b"; }), "must not contain ','");
  has(manifest_error([](json& j) { j["groups"][1]["name"] = "x=y"; }), "groups[1].name");
  has(manifest_error([](json& j) { j["groups"][1]["experts"][0]["adapter"] = "e/cardio/"; }),
      "already expert 'cardio': an expert belongs to one group");
  has(manifest_error([](json& j) { j["groups"][1]["experts"][0]["name"] = "cardio"; }), "duplicate expert name");
  has(manifest_error([](json& j) { j["base_model"] = "../base.gguf"; }), "leaves the bundle directory");
  has(manifest_error([](json& j) { j["router"]["tau_group"] = "x"; }), "router.tau_group: expected a number");
}

}  // namespace
}  // namespace atmoe::test
