// Parity with llama.cpp on the real SmolLM2-135M-Instruct Q4_1 GGUF, against the goldens
// made by tests/parity/make_goldens.py (llama.cpp on the F32 requantisation of the same
// file): tokenizer ids, teacher-forced logits (relative L2 per position, top-1
// agreement) in f32 and bf16, and 32-token greedy continuations. The logits and greedy
// tests run on every registered backend (TEST_P: cpu is a parity test, cuda a gpu test that
// skips without a GPU); a GPU run also checks that its greedy tokens equal the CPU's.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "coordinator/engine.h"
#include "coordinator/model.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

struct Goldens {
  json doc;
  std::vector<float> logits;  // [case][position][subset]
};

const Goldens& goldens() {
  static Goldens g = [] {
    Goldens r;
    const char* dir = std::getenv("ATMOE_GOLDENS");
    std::string d = dir ? dir : "tests/parity/goldens";
    std::ifstream f(d + "/smollm2_q4_1.json");
    EXPECT_TRUE(bool(f)) << "missing goldens in " << d;
    r.doc = json::parse(f);
    std::ifstream b(d + "/" + r.doc["logits_file"].get<std::string>(), std::ios::binary);
    std::string raw((std::istreambuf_iterator<char>(b)), std::istreambuf_iterator<char>());
    r.logits.resize(raw.size() / 4);
    std::memcpy(r.logits.data(), raw.data(), r.logits.size() * 4);
    return r;
  }();
  return g;
}

std::string model_path() {
  const char* p = std::getenv("ATMOE_TEST_MODEL");
  return p ? p : "";
}

class Parity : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(model_path())) << "ATMOE_TEST_MODEL='" << model_path()
                                          << "' not found: run deploy/fetch-model.sh (deploy/test.sh does)";
  }
};

TEST_F(Parity, TokenizerIdsEqualLlamaCpp) {
  auto m = Model::load(model_path(), DType::BF16);
  const auto& t = goldens().doc["tokenizer"];
  int bad = 0;
  for (size_t i = 0; i < t["strings"].size(); ++i) {
    std::string s = t["strings"][i].get<std::string>();
    auto sp = m->tokenizer().encode(s, false, true);
    auto pl = m->tokenizer().encode(s, false, false);
    EXPECT_EQ(sp, t["special"][i].get<std::vector<int32_t>>()) << "parse_special=true: " << json(s).dump();
    EXPECT_EQ(pl, t["plain"][i].get<std::vector<int32_t>>()) << "parse_special=false: " << json(s).dump();
    bad += sp != t["special"][i].get<std::vector<int32_t>>();
    // Detokenisation inverts tokenisation for text without special tokens.
    if (s.find("<|") == std::string::npos) {
      EXPECT_EQ(m->tokenizer().decode(pl), s);
    }
  }
  std::printf("tokenizer: %d of %zu strings differ from llama.cpp\n", bad, t["strings"].size());
}

class ParityOn : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(model_path())) << "ATMOE_TEST_MODEL='" << model_path()
                                          << "' not found: run deploy/fetch-model.sh (deploy/test.sh does)";
    std::string why;
    if (!backend_available(GetParam(), &why)) ATMOE_SKIP_OR_FAIL(why);
    be_ = make_backend(GetParam());
    std::printf("backend: %s\n", be_->description().c_str());
  }
  std::unique_ptr<Backend> be_;
};

void check_logits(Backend& be, DType dt, double max_rel_l2, double min_top1) {
  auto m = Model::load(model_path(), dt, false, &be);
  const auto& g = goldens();
  const auto subset = g.doc["subset"].get<std::vector<int64_t>>();
  const int64_t V = g.doc["n_vocab"].get<int64_t>(), S = int64_t(subset.size()), NC = g.doc["n_cont"].get<int64_t>();
  ASSERT_EQ(V, m->config().vocab);
  ASSERT_EQ(g.logits.size(), g.doc["cases"].size() * size_t(NC * S));
  const float* gl = g.logits.data();
  int64_t agree = 0, total = 0;
  double worst = 0, sum = 0;
  for (size_t c = 0; c < g.doc["cases"].size(); ++c) {
    const auto& cs = g.doc["cases"][c];
    auto seq = cs["prompt_tokens"].get<std::vector<int32_t>>();
    int64_t P = int64_t(seq.size());
    auto cont = cs["continuation"].get<std::vector<int32_t>>();
    seq.insert(seq.end(), cont.begin(), cont.end());
    auto cache = m->new_cache();
    std::vector<float> lg;
    m->forward({{cache.get(), seq.data(), int64_t(seq.size()), LogitsMode::All}}, lg);
    auto top1 = cs["top1"].get<std::vector<int32_t>>();
    for (int64_t j = 0; j < NC; ++j) {
      const float* ours = lg.data() + (P - 1 + j) * V;
      const float* ref = gl + (int64_t(c) * NC + j) * S;
      double num = 0, den = 0;
      for (int64_t k = 0; k < S; ++k) {
        double d = double(ours[subset[size_t(k)]]) - ref[k];
        num += d * d;
        den += double(ref[k]) * ref[k];
      }
      double rel = std::sqrt(num / den);
      worst = std::max(worst, rel);
      sum += rel;
      EXPECT_LE(rel, max_rel_l2) << "case " << c << " position " << j;
      int64_t best = 0;
      for (int64_t k = 1; k < V; ++k)
        if (ours[k] > ours[best]) best = k;
      agree += best == top1[size_t(j)];
      ++total;
    }
  }
  double rate = double(agree) / double(total);
  std::printf("%s: relative L2 worst %.3g mean %.3g; top-1 agreement %.2f%% (%lld/%lld)\n", dtype_name(dt), worst,
              sum / double(total), 100 * rate, (long long)agree, (long long)total);
  EXPECT_GE(rate, min_top1);
}

TEST_P(ParityOn, F32LogitsMatchLlamaCpp) { check_logits(*be_, DType::F32, 3e-3, 0.995); }
TEST_P(ParityOn, Bf16LogitsMatchLlamaCpp) { check_logits(*be_, DType::BF16, 2e-2, 0.98); }

std::vector<GenerateResult> greedy_on(Backend& be) {
  auto m = Model::load(model_path(), DType::F32, false, &be);
  Engine e(*m);
  std::vector<GenerateRequest> reqs;
  for (const auto& cs : goldens().doc["cases"]) {
    GenerateRequest r;
    r.prompt = cs["prompt_tokens"].get<std::vector<int32_t>>();
    r.max_tokens = int(cs["greedy"].size());
    r.ignore_eos = true;  // llama.cpp's reference ran argmax without stopping
    reqs.push_back(r);
  }
  return e.run(reqs);  // all ten in one continuous batch
}

TEST_P(ParityOn, GreedyContinuationsMatchLlamaCpp) {
  auto res = greedy_on(*be_);
  int same = 0;
  for (size_t i = 0; i < res.size(); ++i) {
    bool eq = res[i].tokens == goldens().doc["cases"][i]["greedy"].get<std::vector<int32_t>>();
    same += eq;
    if (!eq) std::printf("greedy differs for prompt %zu\n", i);
  }
  std::printf("greedy: %d of %zu continuations identical\n", same, res.size());
  EXPECT_GE(same, 9);
  // A device backend with f32 activations gives the CPU's greedy tokens (DESIGN.md 6).
  if (!be_->host_memory()) {
    auto cpu = greedy_on(cpu_backend());
    for (size_t i = 0; i < res.size(); ++i) EXPECT_EQ(res[i].tokens, cpu[i].tokens) << "prompt " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, ParityOn, ::testing::ValuesIn(backend_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace
}  // namespace atmoe::test
