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
#include "tests/unit/check.h"

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

// Float64 reference: HF LlamaForCausalLM semantics (rotate_half RoPE), all positions.
std::vector<double> reference_logits(const std::string& dir, const std::vector<int32_t>& toks) {
  SafetensorsFile f(dir + "/model.safetensors");
  auto W = [&](const std::string& n) {
    Tensor t = f.get(n).to(DType::F32);
    return std::vector<double>(t.data<float>(), t.data<float>() + t.numel());
  };
  auto add_bias = [&](std::vector<double>& y, const std::string& n, int N) {
    if (!f.has(n)) return;
    auto b = W(n);
    for (size_t i = 0; i < y.size(); ++i) y[i] += b[i % size_t(N)];
  };
  const int L = 3, d = 64, H = 4, Hkv = 2, D = 16, F = 96, V = 300, T = int(toks.size());
  const double eps = 1e-5, theta = 10000;
  auto emb = W("model.embed_tokens.weight");
  std::vector<double> x(size_t(T * d));
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < d; ++i) x[size_t(t * d + i)] = emb[size_t(toks[size_t(t)] * d + i)];
  auto rms = [&](const std::vector<double>& in, const std::vector<double>& w) {
    std::vector<double> o(in.size());
    for (int t = 0; t < T; ++t) {
      double ss = 0;
      for (int i = 0; i < d; ++i) ss += in[size_t(t * d + i)] * in[size_t(t * d + i)];
      double s = 1 / std::sqrt(ss / d + eps);
      for (int i = 0; i < d; ++i) o[size_t(t * d + i)] = in[size_t(t * d + i)] * s * w[size_t(i)];
    }
    return o;
  };
  auto lin = [&](const std::vector<double>& in, int K, const std::vector<double>& w, int N) {
    std::vector<double> o(size_t(T * N));
    for (int t = 0; t < T; ++t)
      for (int n = 0; n < N; ++n) {
        double a = 0;
        for (int k = 0; k < K; ++k) a += in[size_t(t * K + k)] * w[size_t(n * K + k)];
        o[size_t(t * N + n)] = a;
      }
    return o;
  };
  auto rope = [&](std::vector<double>& v, int heads) {
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < D / 2; ++i) {
          double a = t * std::pow(theta, -2.0 * i / D);
          double& x0 = v[size_t((t * heads + h) * D + i)];
          double& x1 = v[size_t((t * heads + h) * D + i + D / 2)];
          double r0 = x0 * std::cos(a) - x1 * std::sin(a), r1 = x1 * std::cos(a) + x0 * std::sin(a);
          x0 = r0;
          x1 = r1;
        }
  };
  for (int l = 0; l < L; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    auto h = rms(x, W(p + "input_layernorm.weight"));
    auto q = lin(h, d, W(p + "self_attn.q_proj.weight"), H * D);
    auto k = lin(h, d, W(p + "self_attn.k_proj.weight"), Hkv * D);
    auto v = lin(h, d, W(p + "self_attn.v_proj.weight"), Hkv * D);
    add_bias(q, p + "self_attn.q_proj.bias", H * D);
    add_bias(k, p + "self_attn.k_proj.bias", Hkv * D);
    add_bias(v, p + "self_attn.v_proj.bias", Hkv * D);
    rope(q, H);
    rope(k, Hkv);
    std::vector<double> att(size_t(T * H * D));
    for (int t = 0; t < T; ++t)
      for (int hh = 0; hh < H; ++hh) {
        int kh = hh / (H / Hkv);
        std::vector<double> s(size_t(t + 1));
        double m = -1e300, z = 0;
        for (int j = 0; j <= t; ++j) {
          double a = 0;
          for (int i = 0; i < D; ++i) a += q[size_t((t * H + hh) * D + i)] * k[size_t((j * Hkv + kh) * D + i)];
          s[size_t(j)] = a / std::sqrt(double(D));
          m = std::max(m, s[size_t(j)]);
        }
        for (auto& e : s) z += (e = std::exp(e - m));
        for (int i = 0; i < D; ++i) {
          double o = 0;
          for (int j = 0; j <= t; ++j) o += s[size_t(j)] / z * v[size_t((j * Hkv + kh) * D + i)];
          att[size_t((t * H + hh) * D + i)] = o;
        }
      }
    auto o = lin(att, H * D, W(p + "self_attn.o_proj.weight"), d);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = rms(x, W(p + "post_attention_layernorm.weight"));
    auto g = lin(h, d, W(p + "mlp.gate_proj.weight"), F);
    auto u = lin(h, d, W(p + "mlp.up_proj.weight"), F);
    for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
    auto dn = lin(g, F, W(p + "mlp.down_proj.weight"), d);
    for (size_t i = 0; i < x.size(); ++i) x[i] += dn[i];
  }
  auto xf = rms(x, W("model.norm.weight"));
  return lin(xf, d, emb, V);
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
