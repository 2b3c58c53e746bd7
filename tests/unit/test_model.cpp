// The model runtime on a synth-model (HF format, f32): logits against an independent
// float64 transcription of the Llama forward pass written here from the safetensors
// file; batching, chunked prefill and decode agree with one-sequence runs; the engine's
// stop rules.
#include <cmath>
#include <filesystem>

#include "common/error.h"
#include "common/safetensors.h"
#include "coordinator/engine.h"
#include "coordinator/model.h"
#include "coordinator/synth_model.h"
#include "kernels/backend.h"
#include "tests/unit/staged_backend.h"
#include "tests/unit/check.h"
#include "tests/unit/reference_model.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;

std::string make_synth(const std::string& arch) {
  std::string p = (fs::temp_directory_path() / ("atmoe_model_" + arch + std::to_string(::getpid()))).string();
  SynthModelOptions o;
  o.arch = arch;
  o.out = p;
  o.seed = 11;
  o.layers = 3;
  o.hidden = 64;
  o.heads = 4;
  o.kv_heads = 2;
  o.ffn = 96;
  o.vocab = 300;
  synth_model(o);
  return p;
}

const std::string& synth_dir() {
  static std::string d = make_synth("llama");
  return d;
}

std::vector<int32_t> some_tokens(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng() % 297);
  return t;
}

double rel_l2(const float* a, const double* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

class ModelArch : public ::testing::TestWithParam<std::string> {};
INSTANTIATE_TEST_SUITE_P(Arch, ModelArch, ::testing::Values("llama", "qwen2"));

TEST_P(ModelArch, F32LogitsMatchFloat64Reference) {
  const std::string dir = GetParam() == "llama" ? synth_dir() : make_synth(GetParam());
  auto m = Model::load(dir, DType::F32);
  ASSERT_EQ(m->config().qkv_bias, GetParam() == "qwen2");
  auto toks = some_tokens(40, test_seed() + 30);  // long enough for the prefill paths
  auto ref = reference_logits(dir, toks);
  for (int n : {40, 7}) {  // 7 tokens: the decode-sized GEMM tiles and per-row attention
    auto cache = m->new_cache();
    std::vector<float> lg;
    m->forward({{cache.get(), toks.data(), n, LogitsMode::All}}, lg);
    ASSERT_EQ(lg.size(), size_t(n) * 300);
    for (int t = 0; t < n; ++t) {
      // Logits of a random tiny model are small: compare as a vector (relative L2) and
      // element-wise with an absolute floor.
      EXPECT_LT(rel_l2(lg.data() + t * 300, ref.data() + t * 300, 300), 1e-5) << "n=" << n << " t=" << t;
      std::vector<float> r(ref.begin() + t * 300, ref.begin() + (t + 1) * 300);
      EXPECT_TRUE(all_close(lg.data() + t * 300, r.data(), 300, {1e-6, 1e-4}));
    }
  }
}

TEST(Model, BatchingChunkingAndDecodeAgreeWithSingleRuns) {
  auto m = Model::load(synth_dir(), DType::F32);
  std::vector<std::vector<int32_t>> seqs{some_tokens(9, 1), some_tokens(35, 2), some_tokens(1, 3)};
  // One sequence at a time, full prompt: last-token logits.
  std::vector<std::vector<float>> single;
  for (auto& s : seqs) {
    auto c = m->new_cache();
    std::vector<float> lg;
    m->forward({{c.get(), s.data(), int64_t(s.size()), LogitsMode::Last}}, lg);
    single.push_back(lg);
  }
  // All three in one batch.
  std::vector<std::unique_ptr<KvCache>> cs;
  std::vector<ForwardItem> items;
  for (auto& s : seqs) {
    cs.push_back(m->new_cache());
    items.push_back({cs.back().get(), s.data(), int64_t(s.size()), LogitsMode::Last});
  }
  std::vector<float> lg;
  m->forward(items, lg);
  for (size_t i = 0; i < seqs.size(); ++i)
    EXPECT_TRUE(all_close(lg.data() + i * 300, single[i].data(), 300, {1e-5, 1e-4})) << "batched seq " << i;
  // Chunked prefill (prefix, then the rest in two steps) and token-by-token decode.
  auto& s = seqs[1];
  auto c = m->new_cache();
  m->forward({{c.get(), s.data(), 20, LogitsMode::None}}, lg);
  EXPECT_TRUE(lg.empty());
  m->forward({{c.get(), s.data() + 20, 10, LogitsMode::None}}, lg);
  for (size_t j = 30; j < s.size(); ++j) m->forward({{c.get(), s.data() + j, 1, LogitsMode::Last}}, lg);
  EXPECT_EQ(c->len(), int64_t(s.size()));
  EXPECT_TRUE(all_close(lg.data(), single[1].data(), 300, {1e-5, 1e-4}));
}

TEST(Model, DeviceMemoryPathsGiveTheHostResult) {
  StagedCpu dev;
  auto h = Model::load(synth_dir(), DType::F32);
  auto d = Model::load(synth_dir(), DType::F32, false, &dev);
  EXPECT_EQ(&d->backend(), &dev);
  std::vector<std::vector<int32_t>> seqs{some_tokens(9, 4), some_tokens(23, 5), some_tokens(1, 6)};
  std::vector<std::unique_ptr<KvCache>> ch, cd;
  std::vector<ForwardItem> ih, id;
  for (auto& s : seqs) {
    ch.push_back(h->new_cache());
    cd.push_back(d->new_cache());
    ih.push_back({ch.back().get(), s.data(), int64_t(s.size()), LogitsMode::All});
    id.push_back({cd.back().get(), s.data(), int64_t(s.size()), LogitsMode::All});
  }
  std::vector<float> lh, ld = poisoned(7);
  h->forward(ih, lh);
  const int up0 = dev.uploads, down0 = dev.downloads;
  d->forward(id, ld);
  EXPECT_GT(dev.uploads, up0);      // the embedding rows and positions went up
  EXPECT_GT(dev.downloads, down0);  // the logits came back
  ASSERT_EQ(lh.size(), ld.size());
  EXPECT_EQ(lh, ld);
  // A decode step on the caches the first step filled (the KV rows written on the device).
  for (size_t i = 0; i < seqs.size(); ++i) {
    ih[i] = {ch[i].get(), &seqs[i][0], 1, LogitsMode::Last};
    id[i] = {cd[i].get(), &seqs[i][0], 1, LogitsMode::Last};
  }
  h->forward(ih, lh);
  d->forward(id, ld);
  EXPECT_EQ(lh, ld);
  EXPECT_EQ(h->pooled_hidden(seqs[1].data(), 23, 1), d->pooled_hidden(seqs[1].data(), 23, 1));
}

TEST(Model, Bf16StaysCloseToF32) {
  auto f = Model::load(synth_dir(), DType::F32);
  auto b = Model::load(synth_dir(), DType::BF16);
  auto toks = some_tokens(12, 5);
  auto cf = f->new_cache(), cb = b->new_cache();
  std::vector<float> lf, lb;
  f->forward({{cf.get(), toks.data(), 12, LogitsMode::All}}, lf);
  b->forward({{cb.get(), toks.data(), 12, LogitsMode::All}}, lb);
  std::vector<double> ld(lf.begin(), lf.end());
  EXPECT_LT(rel_l2(lb.data(), ld.data(), lb.size()), 2e-2);
  EXPECT_GT(rel_l2(lb.data(), ld.data(), lb.size()), 0.0);  // bf16 really is in use
}

TEST(Engine, GreedyIsDeterministicAndStopsAsAsked) {
  auto m = Model::load(synth_dir(), DType::F32);
  Engine e(*m);
  GenerateRequest r;
  r.prompt = some_tokens(6, 9);
  r.max_tokens = 12;
  r.ignore_eos = true;
  auto a = e.run({r, r});
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(a[0].tokens.size(), 12u);
  EXPECT_EQ(a[0].finish_reason, "length");
  EXPECT_EQ(a[0].tokens, a[1].tokens);
  EXPECT_EQ(a[0].text, m->tokenizer().decode(a[0].tokens));
  // Stop at a string taken from the middle of the greedy text.
  std::string text = a[0].text;
  ASSERT_GT(text.size(), 4u);
  GenerateRequest s = r;
  s.stop = {text.substr(text.size() / 2, 2)};
  std::string streamed;
  auto b = e.run({s}, [&](size_t, const std::string& d) { streamed += d; });
  EXPECT_EQ(b[0].finish_reason, "stop");
  EXPECT_EQ(b[0].text, text.substr(0, text.find(s.stop[0])));
  EXPECT_EQ(streamed, b[0].text);
  // Sampling with a seed is reproducible; different seeds differ somewhere.
  GenerateRequest t = r;
  t.sampling = {1.5f, 0, 1.f};
  t.seed = 42;
  auto c1 = e.run({t}), c2 = e.run({t});
  EXPECT_EQ(c1[0].tokens, c2[0].tokens);
  // Invalid requests are input errors.
  GenerateRequest bad = r;
  bad.sampling.top_p = 0;
  EXPECT_THROW(e.run({bad}), InputError);
  bad = r;
  bad.max_tokens = 1 << 20;
  EXPECT_THROW(e.run({bad}), InputError);
}

}  // namespace
}  // namespace atmoe::test
