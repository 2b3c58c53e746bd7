// AT-MoE experts in the forward pass, on a synth-model with a synth-bundle:
//  - routing off is exactly the base model;
//  - pinned one-expert groups (+ a general expert) equal an independent float64 forward
//    pass with the PEFT LoRA terms read straight from the adapter files;
//  - one batch of sequences with different mixes equals each sequence run alone;
//  - per_token routing and traces.
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <thread>

#include "common/bundle.h"
#include "common/error.h"
#include "common/safetensors.h"
#include "coordinator/engine.h"
#include "coordinator/experts.h"
#include "coordinator/model.h"
#include "coordinator/synth_bundle.h"
#include "coordinator/synth_model.h"
#include "coordinator/trace.h"
#include "coordinator/trex_pool.h"
#include "kernels/cpu/backend_cpu.h"
#include "kernels/thread_pool.h"
#include "tests/unit/check.h"
#include "tests/unit/gguf_writer.h"
#include "tests/unit/reference_model.h"
#include "tests/unit/staged_backend.h"
#include "worker/expert_shard.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;

std::string tmp(const std::string& n) {
  return (fs::temp_directory_path() / ("atmoe_experts_" + n + "_" + std::to_string(::getpid()))).string();
}

const std::string& base_dir() {
  static std::string d = [] {
    SynthModelOptions o;
    o.out = tmp("base");
    o.seed = 11;
    o.layers = 3;
    o.hidden = 64;
    o.heads = 4;
    o.kv_heads = 2;
    o.ffn = 96;
    o.vocab = 300;
    synth_model(o);
    return o.out;
  }();
  return d;
}

std::string make_bundle(const std::string& name, int groups, int per_group, const std::string& ranks, bool general,
                        const std::string& input = "per_request", const std::string& targets = "q,k,v,o,gate,up,down") {
  SynthBundleOptions o;
  o.base = base_dir();
  o.out = tmp(name);
  o.groups = groups;
  o.per_group = per_group;
  o.ranks = ranks;
  o.general = general;
  o.input = input;
  o.targets = targets;
  o.seed = 5;
  o.b_std = 0.2;  // large enough that every expert visibly moves the logits
  synth_bundle(o);
  return o.out;
}

std::vector<int32_t> toks(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng() % 297);
  return t;
}

std::vector<float> run(Model& m, const std::vector<int32_t>& t, SeqRouting* r) {
  auto c = m.new_cache();
  std::vector<float> lg;
  m.forward({{c.get(), t.data(), int64_t(t.size()), LogitsMode::All, r}}, lg);
  return lg;
}

double rel_l2(const std::vector<float>& a, const std::vector<double>& b) {
  double n = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) n += (a[i] - b[i]) * (a[i] - b[i]), d += b[i] * b[i];
  return std::sqrt(n / d);
}

TEST(Experts, RoutingOffIsExactlyTheBase) {
  std::string bd = make_bundle("off", 2, 2, "4,8", true);
  auto base = Model::load(base_dir(), DType::F32);
  auto m = Model::load(base_dir(), DType::F32);
  ExpertPool pool(load_bundle_manifest(bd), m->config());
  m->set_experts(&pool);
  RoutingControls c;
  c.off = true;
  auto r = pool.new_routing(c);
  auto t = toks(20, 1);
  EXPECT_EQ(run(*m, t, r.get()), run(*base, t, nullptr));
  EXPECT_EQ(run(*m, t, nullptr), run(*base, t, nullptr));  // no routing state: base only
  RoutingControls on;
  auto r2 = pool.new_routing(on);
  EXPECT_NE(run(*m, t, r2.get()), run(*base, t, nullptr));  // and the experts do act when on
}

TEST(Experts, PinnedMixtureMatchesFloat64PeftReference) {
  // Three one-expert groups of heterogeneous rank plus a general expert: pins fix the
  // weights, so Δ = λ Σ_g pin_g s_g B_g A_g x + (1 - λ) s_p B_p A_p x exactly.
  std::string bd = make_bundle("pin", 3, 1, "4,8,3", true);
  Bundle b = load_bundle_manifest(bd);
  auto m = Model::load(base_dir(), DType::F32);
  ExpertPool pool(b, m->config());
  m->set_experts(&pool);
  std::mt19937_64 rng(test_seed() + 60);
  for (int trial = 0; trial < 3; ++trial) {
    RoutingControls c;
    double p0 = 0.1 + double(rng() % 10), p1 = double(rng() % 10), p2 = 0.5;
    c.pin = {{b.groups[0].name, p0}, {b.groups[1].name, p1}, {b.groups[2].name, p2}};
    c.lambda = trial == 2 ? 1.0 : 0.25 + 0.25 * trial;
    auto r = pool.new_routing(c);
    auto t = toks(9 + 20 * trial, 100 + uint64_t(trial));  // 9, 29, 49 tokens: decode tiles, GEMM attention
    auto got = run(*m, t, r.get());
    double sum = p0 + p1 + p2, lam = *c.lambda;
    std::vector<RefLora> lo{{b.experts[0].adapter_dir, lam * p0 / sum},
                            {b.experts[1].adapter_dir, lam * p1 / sum},
                            {b.experts[2].adapter_dir, lam * p2 / sum},
                            {b.general->adapter_dir, 1 - lam}};
    auto ref = reference_logits(base_dir(), t, lo);
    auto base_ref = reference_logits(base_dir(), t);
    EXPECT_LT(rel_l2(got, ref), 1e-5) << "trial " << trial;
    EXPECT_GT(rel_l2(got, base_ref), 1e-3) << "the experts must change the logits";
  }
}

TEST(Experts, AdapterIsTheExpertAloneAtWeightOne) {
  // --adapter X on a bundle with a general expert and lambda 0.8: Δ = s_X B_X A_X x, nothing
  // of the general expert and no lambda factor (vLLM-style serving of one LoRA by name).
  std::string bd = make_bundle("adapter", 2, 2, "4,8", true);
  Bundle b = load_bundle_manifest(bd);
  ASSERT_TRUE(b.general && b.lambda < 1);
  auto m = Model::load(base_dir(), DType::F32);
  ExpertPool pool(b, m->config());
  m->set_experts(&pool);
  std::mt19937_64 rng(test_seed() + 61);
  const int e = int(rng() % b.experts.size());
  RoutingControls c;
  c.adapter = b.experts[size_t(e)].name;
  auto r = pool.new_routing(c);
  auto t = toks(13, 200 + uint64_t(e));
  auto got = run(*m, t, r.get());
  auto ref = reference_logits(base_dir(), t, {{b.experts[size_t(e)].adapter_dir, 1.0}});
  EXPECT_LT(rel_l2(got, ref), 1e-5) << c.adapter;
  // Controls that would change a single adapter's output are refused, not ignored.
  for (auto edit : std::vector<std::function<void(RoutingControls&)>>{
           [](RoutingControls& x) { x.mask = {"law"}; }, [](RoutingControls& x) { x.lambda = 0.5; },
           [&](RoutingControls& x) { x.pin = {{b.groups[0].name, 1.0}}; }, [](RoutingControls& x) { x.top_k_groups = 1; }}) {
    RoutingControls bad = c;
    edit(bad);
    try {
      pool.new_routing(bad);
      ADD_FAILURE() << "accepted";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("adapter serves one expert alone at weight 1; it cannot be combined with"),
                std::string::npos) << e.what();
    }
  }
}

TEST(Experts, BatchOfDifferentMixesEqualsSingleRuns) {
  std::string bd = make_bundle("batch", 4, 2, "8,4,16", false);
  Bundle b = load_bundle_manifest(bd);
  auto m = Model::load(base_dir(), DType::F32);
  ExpertPool pool(b, m->config());
  m->set_experts(&pool);
  std::vector<RoutingControls> cs(5);
  cs[1].top_k_groups = 1;
  cs[2].adapter = b.experts[3].name;
  cs[3].mask = {b.groups[0].name, b.experts[5].name};
  cs[3].tau_expert = 0;
  cs[4].pin = {{b.groups[2].name, 1.0}};
  std::vector<std::vector<int32_t>> ts{toks(7, 1), toks(18, 2), toks(3, 3), toks(25, 4), toks(1, 5)};
  std::vector<std::vector<float>> alone;
  for (size_t i = 0; i < cs.size(); ++i) {
    auto r = pool.new_routing(cs[i]);
    auto lg = run(*m, ts[i], r.get());
    alone.emplace_back(lg.end() - 300, lg.end());
  }
  std::vector<std::unique_ptr<SeqRouting>> rs;
  std::vector<std::unique_ptr<KvCache>> caches;
  std::vector<ForwardItem> items;
  for (size_t i = 0; i < cs.size(); ++i) {
    rs.push_back(pool.new_routing(cs[i]));
    caches.push_back(m->new_cache());
    items.push_back({caches.back().get(), ts[i].data(), int64_t(ts[i].size()), LogitsMode::Last, rs.back().get()});
  }
  std::vector<float> lg;
  m->forward(items, lg);
  for (size_t i = 0; i < cs.size(); ++i)
    EXPECT_TRUE(all_close(lg.data() + i * 300, alone[i].data(), 300, {1e-5, 1e-4})) << "sequence " << i;
  // Decode steps continue with the per-request weights fixed at prefill.
  std::vector<int32_t> next(cs.size(), 17);
  items.clear();
  for (size_t i = 0; i < cs.size(); ++i) items.push_back({caches[i].get(), &next[i], 1, LogitsMode::Last, rs[i].get()});
  m->forward(items, lg);
  for (size_t i = 0; i < cs.size(); ++i) {
    // Alone: prefill, then the same decode step, with its own routing state.
    auto r = pool.new_routing(cs[i]);
    auto c = m->new_cache();
    std::vector<float> one;
    m->forward({{c.get(), ts[i].data(), int64_t(ts[i].size()), LogitsMode::Last, r.get()}}, one);
    m->forward({{c.get(), &next[i], 1, LogitsMode::Last, r.get()}}, one);
    EXPECT_TRUE(all_close(lg.data() + i * 300, one.data(), 300, {1e-5, 1e-4})) << "decode, sequence " << i;
  }
  // A single adapter is routing-independent: the decode step equals a prefill of prompt + token.
  {
    auto r = pool.new_routing(cs[2]);
    auto t = ts[2];
    t.push_back(17);
    auto one = run(*m, t, r.get());
    EXPECT_TRUE(all_close(lg.data() + 2 * 300, one.data() + (t.size() - 1) * 300, 300, {1e-5, 1e-4}));
  }
  // The masked experts got zero weight in every layer.
  for (const auto& w : rs[3]->w) {
    for (int e : b.groups[0].experts) EXPECT_EQ(w[size_t(e)], 0.0);
    EXPECT_EQ(w[5], 0.0);
  }
}

// ExpertShard::post/finish, the way LocalExperts runs a site input's experts beside its
// base GEMM, give apply()'s results: a one-token call goes to a worker of the backend's pool
// while the caller runs a stand-in GEMM's chunks; the same call with no region between post
// and finish comes back and runs at finish; a prefill-sized call is declined and runs into y
// at finish. Every layer and site input; tokens on one group each are the same bits as
// apply() (one sum per output, then one add), tokens on overlapping sets of groups within
// rounding (their groups' sums are added in another order).
TEST(Experts, ShardBesideTheGemmEqualsApply) {
  const std::string bd = make_bundle("beside", 3, 2, "8,4", true);
  const Bundle b = load_bundle_manifest(bd);
  auto m = Model::load(base_dir(), DType::F32);
  ThreadPool pool(2);
  auto be = make_cpu_backend(&pool);
  for (DType dt : {DType::F32, DType::BF16}) {
    ShardSpec sp = shard_spec(m->config(), dt, {0, 1, 2}, true);
    sp.backend = be.get();
    ExpertShard shard(b, sp);
    const int64_t C = shard.n_columns(), nb = int64_t(shard.block_columns().size());
    std::mt19937_64 rng(77);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    const SiteInput ins[] = {SiteInput::AttnIn, SiteInput::AttnOut, SiteInput::MlpIn, SiteInput::MlpAct};
    int64_t beside_calls = 0;
    for (int64_t T : {1, 3, 200})
      for (bool overlap : {false, true})
        for (bool region : {true, false}) {
          // Token t uses block t % nb (overlap: also every block after it).
          std::vector<float> coef(size_t(T * C), 0.f);
          for (int64_t t = 0; t < T; ++t)
            for (int64_t bi = t % nb; bi < (overlap ? nb : t % nb + 1); ++bi)
              for (int c = shard.block_columns()[size_t(bi)].first; c < shard.block_columns()[size_t(bi)].second; ++c)
                coef[size_t(t * C + c)] = 0.25f + 0.5f * std::abs(U(rng));
          for (int l = 0; l < m->config().n_layers; ++l)
            for (SiteInput in : ins) {
              const int64_t K = shard.d_in(in), W = shard.out_cols(in);
              std::vector<float> x(size_t(T * K)), y0(size_t(T * W));
              for (auto& v : x) v = U(rng);
              for (auto& v : y0) v = U(rng);
              std::vector<float> y1 = y0, y2 = y0;
              shard.apply(l, in, x.data(), K, coef.data(), C, y1.data(), W, T);
              const int64_t taken0 = pool.side_jobs_taken();
              ASSERT_TRUE(shard.post(l, in, x.data(), K, coef.data(), C, T));
              const bool pending = pool.side_job_pending();
              if (region)  // the base GEMM: its chunks wait (bounded) for a worker to take the call
                pool.parallel_for(64, [&](int64_t, int64_t) {
                  const auto t0 = std::chrono::steady_clock::now();
                  while (pending && pool.side_jobs_taken() == taken0 &&
                         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
                    std::this_thread::yield();
                });
              shard.finish(y2.data(), W);
              const bool went_beside = pool.side_jobs_taken() > taken0;
              EXPECT_EQ(went_beside, pending && region) << "T " << T << " layer " << l;
              EXPECT_FALSE(pool.side_job_pending());
              if (T == 1) {
                EXPECT_TRUE(pending) << "layer " << l << ": a one-token call was not posted beside";
              }
              if (T == 200) {
                EXPECT_FALSE(pending) << "layer " << l << ": a prefill-sized call was posted beside";
              }
              beside_calls += went_beside;
              if (!overlap) {
                EXPECT_EQ(std::memcmp(y1.data(), y2.data(), y1.size() * 4), 0)
                    << "T " << T << " layer " << l << " input " << int(in) << " region " << region;
              } else {
                EXPECT_TRUE(all_close(y2.data(), y1.data(), y1.size(), kF32))
                    << "T " << T << " layer " << l << " input " << int(in);
              }
              EXPECT_FALSE(std::equal(y0.begin(), y0.end(), y2.begin())) << "the experts added nothing";
            }
        }
    EXPECT_GT(beside_calls, 0);
    // A post() whose finish() never came (an exception between them) is dropped by the next
    // post(), whose result is still apply()'s; a shard destroyed with a post() pending leaves
    // the pool no job.
    {
      const int64_t K = shard.d_in(SiteInput::MlpIn), W = shard.out_cols(SiteInput::MlpIn);
      std::vector<float> coef(size_t(C), 0.f), x(static_cast<size_t>(K)), y1(size_t(W), 0.5f), y2 = y1;
      for (int c = 0; c < shard.block_columns()[1].second; ++c) coef[size_t(c)] = 0.5f;
      for (auto& v : x) v = U(rng);
      shard.apply(1, SiteInput::MlpIn, x.data(), K, coef.data(), C, y1.data(), W, 1);
      const auto gemm = [&] {  // its chunks wait (bounded) for a worker to take the experts
        const int64_t taken0 = pool.side_jobs_taken();
        pool.parallel_for(64, [&](int64_t, int64_t) {
          const auto t0 = std::chrono::steady_clock::now();
          while (pool.side_jobs_taken() == taken0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
            std::this_thread::yield();
        });
        EXPECT_EQ(pool.side_jobs_taken(), taken0 + 1);
      };
      ASSERT_TRUE(shard.post(0, SiteInput::MlpIn, x.data(), K, coef.data(), C, 1));
      gemm();  // computed into the deltas, never finished
      ASSERT_TRUE(shard.post(1, SiteInput::MlpIn, x.data(), K, coef.data(), C, 1));
      gemm();
      shard.finish(y2.data(), W);
      EXPECT_EQ(std::memcmp(y1.data(), y2.data(), y1.size() * 4), 0);
      auto gone = std::make_unique<ExpertShard>(b, sp);
      ASSERT_TRUE(gone->post(0, SiteInput::MlpIn, x.data(), K, coef.data(), C, 1));
      EXPECT_TRUE(pool.side_job_pending());
      gone.reset();
      EXPECT_FALSE(pool.side_job_pending());
      // Posted, never offered, then apply(): the post is dropped, apply()'s result stands.
      std::vector<float> y3(size_t(W), 0.5f);
      ASSERT_TRUE(shard.post(0, SiteInput::MlpIn, x.data(), K, coef.data(), C, 1));
      shard.apply(1, SiteInput::MlpIn, x.data(), K, coef.data(), C, y3.data(), W, 1);
      EXPECT_FALSE(pool.side_job_pending());
      EXPECT_EQ(std::memcmp(y1.data(), y3.data(), y1.size() * 4), 0);
    }
  }
}

// In-process experts on a device backend (the model's, as attach_experts gives them):
// AT-MoE per_request and per_token with a general expert, a batch of different mixes then
// a decode step, and T-REX, through the device-memory paths (router rows downloaded, the
// coefficients and T-REX tables uploaded, banks prepared by that backend) give the logits
// of the same experts on the host.
TEST(Experts, OnADeviceBackendGiveTheHostResult) {
  StagedCpu dev;
  auto check = [&](Model& mh, Model& md, ExpertDispatch& ph, ExpertDispatch& pd,
                   const std::vector<RoutingControls>& cs, const char* what) {
    SCOPED_TRACE(what);
    mh.set_experts(&ph);
    md.set_experts(&pd);
    std::vector<std::vector<int32_t>> ts{toks(9, 21), toks(14, 22), toks(4, 23)};
    std::vector<std::unique_ptr<SeqRouting>> rh, rd;
    std::vector<std::unique_ptr<KvCache>> ch, cd;
    std::vector<ForwardItem> ih, id;
    for (size_t i = 0; i < ts.size(); ++i) {
      rh.push_back(ph.new_routing(cs[i % cs.size()]));
      rd.push_back(pd.new_routing(cs[i % cs.size()]));
      ch.push_back(mh.new_cache());
      cd.push_back(md.new_cache());
      ih.push_back({ch.back().get(), ts[i].data(), int64_t(ts[i].size()), LogitsMode::All, rh.back().get()});
      id.push_back({cd.back().get(), ts[i].data(), int64_t(ts[i].size()), LogitsMode::All, rd.back().get()});
    }
    std::vector<float> lh, ld;
    const int up0 = dev.uploads;
    mh.forward(ih, lh);
    md.forward(id, ld);
    EXPECT_GT(dev.uploads - up0, 3 * 4);  // more than one upload per layer: the experts' tables went up
    ASSERT_EQ(lh.size(), ld.size());
    EXPECT_TRUE(all_close(ld.data(), lh.data(), lh.size(), kF32));
    std::vector<int32_t> next{5, 6, 7};
    for (size_t i = 0; i < ts.size(); ++i) {
      ih[i] = {ch[i].get(), &next[i], 1, LogitsMode::Last, rh[i].get()};
      id[i] = {cd[i].get(), &next[i], 1, LogitsMode::Last, rd[i].get()};
    }
    mh.forward(ih, lh);
    md.forward(id, ld);
    EXPECT_TRUE(all_close(ld.data(), lh.data(), lh.size(), kF32)) << "decode";
    mh.set_experts(nullptr);
    md.set_experts(nullptr);
  };
  auto mh = Model::load(base_dir(), DType::F32);
  auto md = Model::load(base_dir(), DType::F32, false, &dev);
  for (const char* input : {"per_request", "per_token"}) {
    Bundle b = load_bundle_manifest(make_bundle(std::string("dev_") + input, 3, 2, "4,8", true, input));
    ExpertPool ph(b, mh->config());
    ExpertPool pd(b, md->config(), DType::F32, false, &dev);
    ASSERT_EQ(pd.local_shard()->spec().backend, &dev);
    std::vector<RoutingControls> cs(3);
    cs[1].top_k_groups = 1;
    cs[2].pin = {{b.groups[1].name, 1.0}};
    check(*mh, *md, ph, pd, cs, input);
  }
  SynthBundleOptions o;
  o.base = base_dir();
  o.out = tmp("dev_trex");
  o.method = "t-rex";
  o.ranks = "4,3";
  o.seed = 9;
  o.b_std = 0.2;
  synth_bundle(o);
  Bundle bt = load_bundle_manifest(o.out);
  TrexPool th(bt, mh->config(), DType::F32), td(bt, md->config(), DType::F32, &dev);
  check(*mh, *md, th, td, {RoutingControls{}}, "t-rex");
}

TEST(Experts, PerTokenRoutingAndTrace) {
  std::string bd = make_bundle("tok", 3, 2, "4", false, "per_token", "q,v,down");
  Bundle b = load_bundle_manifest(bd);
  auto m = Model::load(base_dir(), DType::F32);
  ExpertPool pool(b, m->config());
  m->set_experts(&pool);
  Engine e(*m);
  GenerateRequest r;
  r.prompt = toks(6, 9);
  r.max_tokens = 5;
  r.ignore_eos = true;
  r.trace_tokens = true;
  auto res = e.run({r});
  ASSERT_TRUE(res[0].routing);
  auto j = routing_trace(b, *res[0].routing);
  ASSERT_EQ(j["layers"].size(), 3u);
  for (const auto& l : j["layers"]) {
    double s = 0;
    for (auto& [k, v] : l["groups"].items()) s += v.get<double>();
    EXPECT_NEAR(s, 1.0, 1e-9);
  }
  // 6 prompt tokens + 4 fed-back tokens went through the layers.
  ASSERT_EQ(j["tokens"].size(), 10u);
  // Each token's weights are the router applied to that token's own input: a float64
  // forward pass over the same 10 tokens, routing every token at every layer from its
  // normalised attention input with the router's weights read from the file (the expert
  // mix of earlier layers shapes later inputs, so the whole chain is checked).
  std::vector<int32_t> seq = r.prompt;
  seq.insert(seq.end(), res[0].tokens.begin(), res[0].tokens.begin() + 4);
  SafetensorsFile rf(b.router_file);
  const int G = int(b.groups.size()), E = int(b.experts.size());
  const ResolvedRouting rr = resolve_routing(b, RoutingControls{});
  std::vector<std::vector<std::vector<double>>> want;  // [layer][token][expert]
  want.resize(3);
  auto gate = [&](const std::string& k, int rows, const double* u, std::vector<double>& out) {
    Tensor w = rf.get(k + ".weight").to(DType::F32);
    out.assign(size_t(rows), 0.0);
    for (int i = 0; i < rows; ++i) {
      out[size_t(i)] = rf.has(k + ".bias") ? double(rf.get(k + ".bias").to(DType::F32).data<float>()[i]) : 0.0;
      for (int64_t c = 0; c < 64; ++c) out[size_t(i)] += double(w.data<float>()[i * 64 + c]) * u[c];
    }
  };
  std::vector<RefLora> lo;
  for (const auto& ex : b.experts) lo.push_back({ex.adapter_dir, 0.0});
  auto ref = reference_logits(base_dir(), seq, lo, [&](int l, const double* u) {
    std::vector<double> gl, el, a(static_cast<size_t>(G)), w(static_cast<size_t>(E));
    gate("layers." + std::to_string(l) + ".group_gate", G, u, gl);
    gate("layers." + std::to_string(l) + ".expert_gate", E, u, el);
    route_from_logits(b, gl.data(), el.data(), rr, a.data(), w.data());
    want[size_t(l)].push_back(w);
    return w;
  });
  int differ = 0;
  for (int l = 0; l < 3; ++l) {
    ASSERT_EQ(want[size_t(l)].size(), seq.size());
    for (size_t t = 0; t < seq.size(); ++t)
      for (int e2 = 0; e2 < E; ++e2) {
        const double got = j["tokens"][t]["layers"][size_t(l)]["experts"][b.experts[size_t(e2)].name].get<double>();
        EXPECT_NEAR(got, want[size_t(l)][t][size_t(e2)], 1e-4) << "token " << t << " layer " << l << " expert " << e2;
        differ += std::fabs(want[size_t(l)][t][size_t(e2)] - want[size_t(l)][0][size_t(e2)]) > 1e-3;
      }
  }
  EXPECT_GT(differ, 0) << "every token routed alike: the check would not see a token's own input";
  // And the logits of the prompt under that routing.
  auto cache = m->new_cache();
  auto sr = pool.new_routing(RoutingControls{});
  std::vector<float> lg;
  m->forward({{cache.get(), seq.data(), int64_t(seq.size()), LogitsMode::All, sr.get()}}, lg);
  EXPECT_LT(rel_l2(lg, ref), 1e-4);
}

// The synth-model written as a GGUF the way convert_hf_to_gguf.py writes a llama: q and k
// rows permuted per head for the GGML rope (reshape(n_head, 2, D/2, K).swapaxes(1, 2)).
std::string synth_as_gguf() {
  const std::string dir = base_dir(), out = tmp("gguf") + ".gguf";
  SafetensorsFile st(dir + "/model.safetensors");
  std::ifstream tf(dir + "/tokenizer.json");
  auto tj = nlohmann::json::parse(tf);
  std::vector<std::string> tokens(300);
  std::vector<int32_t> types(300, 1);
  for (auto& [k, v] : tj["model"]["vocab"].items()) tokens[size_t(v.get<int>())] = k;
  for (auto& a : tj["added_tokens"]) {
    tokens[size_t(a["id"].get<int>())] = a["content"].get<std::string>();
    types[size_t(a["id"].get<int>())] = 3;
  }
  GgufBuilder g;
  g.kv_str("general.architecture", "llama");
  g.kv_u32("llama.block_count", 3);
  g.kv_u32("llama.context_length", 512);
  g.kv_u32("llama.embedding_length", 64);
  g.kv_u32("llama.feed_forward_length", 96);
  g.kv_u32("llama.attention.head_count", 4);
  g.kv_u32("llama.attention.head_count_kv", 2);
  g.kv_f32("llama.rope.freq_base", 10000.f);
  g.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  g.kv_u32("llama.vocab_size", 300);
  g.kv_str("tokenizer.ggml.model", "gpt2");
  g.kv_str("tokenizer.ggml.pre", "gpt2");
  g.kv_str_arr("tokenizer.ggml.tokens", tokens);
  g.kv_i32_arr("tokenizer.ggml.token_type", types);
  std::vector<std::string> merges;
  for (auto& m : tj["model"]["merges"]) merges.push_back(m.get<std::string>());
  g.kv_str_arr("tokenizer.ggml.merges", merges);
  auto put = [&](const std::string& name, const std::string& src, int permute_heads) {
    Tensor t = st.get(src).to(DType::F32);
    const int64_t rows = t.ndim() == 2 ? t.dim(0) : 1, cols = t.ndim() == 2 ? t.dim(1) : t.dim(0);
    std::vector<float> v(t.data<float>(), t.data<float>() + t.numel());
    if (permute_heads) {
      const int64_t D = rows / permute_heads;
      std::vector<float> o(v.size());
      for (int64_t head = 0; head < permute_heads; ++head)
        for (int64_t h = 0; h < 2; ++h)
          for (int64_t i = 0; i < D / 2; ++i)
            for (int64_t k = 0; k < cols; ++k)
              o[size_t((head * D + i * 2 + h) * cols + k)] = v[size_t((head * D + h * (D / 2) + i) * cols + k)];
      v = o;
    }
    std::vector<uint8_t> bytes(v.size() * 4);
    std::memcpy(bytes.data(), v.data(), bytes.size());
    std::vector<uint64_t> ne = t.ndim() == 2 ? std::vector<uint64_t>{uint64_t(cols), uint64_t(rows)}
                                             : std::vector<uint64_t>{uint64_t(cols)};
    g.tensor(name, ne, 0, bytes);
  };
  put("token_embd.weight", "model.embed_tokens.weight", 0);
  put("output_norm.weight", "model.norm.weight", 0);
  for (int l = 0; l < 3; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".", q = "blk." + std::to_string(l) + ".";
    put(q + "attn_norm.weight", p + "input_layernorm.weight", 0);
    put(q + "ffn_norm.weight", p + "post_attention_layernorm.weight", 0);
    put(q + "attn_q.weight", p + "self_attn.q_proj.weight", 4);
    put(q + "attn_k.weight", p + "self_attn.k_proj.weight", 2);
    put(q + "attn_v.weight", p + "self_attn.v_proj.weight", 0);
    put(q + "attn_output.weight", p + "self_attn.o_proj.weight", 0);
    put(q + "ffn_gate.weight", p + "mlp.gate_proj.weight", 0);
    put(q + "ffn_up.weight", p + "mlp.up_proj.weight", 0);
    put(q + "ffn_down.weight", p + "mlp.down_proj.weight", 0);
  }
  g.write(out);
  return out;
}

TEST(Experts, PeftAdaptersOnAGgufBaseEqualTheHfBase) {
  // PEFT adapters are trained on HF weights; on a GGUF llama base their q/k rows must follow
  // the GGUF permutation. Same model, same experts, two formats: same logits.
  std::string bd = make_bundle("gguf", 2, 1, "4,8", false);
  Bundle b = load_bundle_manifest(bd);
  auto hf = Model::load(base_dir(), DType::F32);
  auto gg = Model::load(synth_as_gguf(), DType::F32);
  ASSERT_EQ(gg->config().rope_style, RopeStyle::Interleaved);
  ExpertPool ph(b, hf->config()), pg(b, gg->config());
  hf->set_experts(&ph);
  gg->set_experts(&pg);
  auto t = toks(21, 77);
  EXPECT_TRUE(all_close(run(*gg, t, nullptr).data(), run(*hf, t, nullptr).data(), 21 * 300, {1e-5, 1e-4}))
      << "base model: GGUF vs HF";
  RoutingControls c;
  c.pin = {{b.groups[0].name, 0.6}, {b.groups[1].name, 0.4}};
  auto rh = ph.new_routing(c), rg = pg.new_routing(c);
  auto lh = run(*hf, t, rh.get()), lg = run(*gg, t, rg.get());
  EXPECT_TRUE(all_close(lg.data(), lh.data(), lh.size(), {1e-5, 1e-4})) << "with experts: GGUF vs HF";
  EXPECT_EQ(hf->tokenizer().encode("the quick brown fox", false), gg->tokenizer().encode("the quick brown fox", false));
}

}  // namespace
}  // namespace atmoe::test
