// Distributed experts under mpiexec (ctest label `mpi`): rank 0 runs these tests; ranks
// 1..N-1 run the real worker loop. N ranks must give the single-process result:
//  - f32 logits within 1e-5 relative L2 per row, prefill and decode, a batch of sequences
//    with different mixes, both router input modes, a general expert;
//  - greedy tokens identical (Engine);
//  - the work is where the placement says: the coordinator holds no expert banks, every
//    worker computed, and a worker none of whose groups a request uses receives 0 bytes.
// With N = 1 the tests check the in-process path against itself through the same API and
// the placement refusals.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "common/comm_mpi.h"
#include "common/error.h"
#include "coordinator/engine.h"
#include "coordinator/experts.h"
#include "coordinator/model.h"
#include "coordinator/placement.h"
#include "coordinator/remote_experts.h"
#include "coordinator/synth_bundle.h"
#include "coordinator/synth_model.h"
#include "worker/worker_loop.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;

uint64_t seed() {
  static uint64_t s = [] {
    const char* e = std::getenv("ATMOE_TEST_SEED");
    uint64_t v = e ? std::strtoull(e, nullptr, 10) : std::random_device{}();
    std::fprintf(stderr, "ATMOE_TEST_SEED=%llu\n", static_cast<unsigned long long>(v));
    return v;
  }();
  return s;
}

std::string tmp(const std::string& n) {
  return (fs::temp_directory_path() / ("atmoe_mpi_" + n + "_" + std::to_string(::getpid()))).string();
}

const std::string& base_dir() {
  static std::string d = [] {
    SynthModelOptions o;
    o.out = tmp("base");
    o.seed = 21;
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

std::string make_bundle(const std::string& name, const std::string& input, bool general) {
  SynthBundleOptions o;
  o.base = base_dir();
  o.out = tmp(name);
  o.groups = 4;
  o.per_group = 2;
  o.ranks = "8,4,16,2";
  o.general = general;
  o.input = input;
  o.targets = "q,k,v,o,gate,up,down";
  o.seed = 7;
  o.b_std = 0.2;
  if (!fs::exists(o.out)) synth_bundle(o);
  return o.out;
}

std::vector<int32_t> toks(int n, uint64_t s) {
  std::mt19937_64 rng(s);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng() % 297);
  return t;
}

MpiSession& session() {
  return *MpiSession::get();
}

// The experts on every worker rank of this job (or in-process when alone).
std::unique_ptr<ExpertPool> make_pool(const Bundle& b, const Model& m, RemoteExperts** remote = nullptr) {
  if (session().size() == 1) return std::make_unique<ExpertPool>(b, m.config(), m.dtype());
  auto r =
      std::make_unique<RemoteExperts>(session(), b, m.config(), m.dtype(), plan_placement(b, session().size() - 1));
  if (remote) *remote = r.get();
  return std::make_unique<ExpertPool>(b, m.config(), std::move(r));
}

double rel_l2(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) num += double(a[i] - b[i]) * (a[i] - b[i]), den += double(b[i]) * b[i];
  return std::sqrt(num / std::max(den, 1e-30));
}

// A batch of sequences with different mixes: prefill (all logits), then three decode steps.
std::vector<std::vector<float>> run_batch(Model& m, ExpertPool& pool, const Bundle& b) {
  std::vector<RoutingControls> cs(4);
  cs[1].top_k_groups = 1;
  cs[2].mask = {b.groups[0].name, b.experts[5].name};
  cs[3].pin = {{b.groups[2].name, 1.0}, {b.groups[3].name, 0.5}};
  std::vector<std::vector<int32_t>> ts{toks(9, seed() + 1), toks(21, seed() + 2), toks(4, seed() + 3),
                                       toks(33, seed() + 4)};
  std::vector<std::unique_ptr<SeqRouting>> rs;
  std::vector<std::unique_ptr<KvCache>> caches;
  std::vector<ForwardItem> items;
  for (size_t i = 0; i < cs.size(); ++i) {
    rs.push_back(pool.new_routing(cs[i]));
    caches.push_back(m.new_cache());
    items.push_back({caches.back().get(), ts[i].data(), int64_t(ts[i].size()), LogitsMode::All, rs.back().get()});
  }
  std::vector<std::vector<float>> out(1);
  m.forward(items, out[0]);
  std::vector<int32_t> next(cs.size());
  for (int step = 0; step < 3; ++step) {
    items.clear();
    for (size_t i = 0; i < cs.size(); ++i) {
      next[i] = int32_t((seed() + uint64_t(step) * 7 + i) % 297);
      items.push_back({caches[i].get(), &next[i], 1, LogitsMode::Last, rs[i].get()});
    }
    out.emplace_back();
    m.forward(items, out.back());
  }
  return out;
}

class Distributed : public ::testing::TestWithParam<const char*> {};

TEST_P(Distributed, LogitsAndGreedyTokensEqualOneProcess) {
  const std::string bd = make_bundle(std::string("eq_") + GetParam(), GetParam(), true);
  const Bundle b = load_bundle_manifest(bd);
  auto m = Model::load(base_dir(), DType::F32);
  ExpertPool local(b, m->config(), m->dtype());
  m->set_experts(&local);
  const auto want = run_batch(*m, local, b);
  Engine eng(*m);
  std::vector<GenerateRequest> reqs(3);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = toks(5 + 6 * int(i), seed() + 10 + i);
    reqs[i].max_tokens = 12;
    reqs[i].sampling.temperature = 0;
    reqs[i].ignore_eos = true;
  }
  reqs[1].routing.top_k_groups = 2;
  const auto want_gen = eng.run(reqs);

  RemoteExperts* remote = nullptr;
  auto pool = make_pool(b, *m, &remote);
  m->set_experts(pool.get());
  if (session().size() > 1) {
    EXPECT_EQ(pool->local_shard(), nullptr) << "the coordinator holds no expert banks when N > 1";
    ASSERT_NE(remote, nullptr);
  }
  const auto got = run_batch(*m, *pool, b);
  ASSERT_EQ(got.size(), want.size());
  const int64_t V = m->config().vocab;
  for (size_t s = 0; s < got.size(); ++s) {
    ASSERT_EQ(got[s].size(), want[s].size());
    for (size_t r = 0; r < got[s].size() / size_t(V); ++r)
      EXPECT_LT(rel_l2(got[s].data() + r * size_t(V), want[s].data() + r * size_t(V), size_t(V)), 1e-5)
          << "step " << s << " row " << r << " of " << session().size() << " ranks";
  }
  const auto got_gen = Engine(*m).run(reqs);
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(got_gen[i].tokens, want_gen[i].tokens) << "request " << i;
  if (remote) {
    const auto st = remote->worker_stats();
    for (size_t w = 0; w < st.size(); ++w) {
      EXPECT_GT(st[w].at("applies").get<int64_t>(), 0) << "worker rank " << w + 1 << " computed nothing";
      EXPECT_GT(st[w].at("shard_bytes").get<int64_t>(), 0);
    }
  }
  m->set_experts(nullptr);
}

INSTANTIATE_TEST_SUITE_P(RouterInput, Distributed, ::testing::Values("per_request", "per_token"));

TEST(DistributedWork, IdleWorkersReceiveNothing) {
  // One request pinned to one group (λ = 1: the general expert is off): only the worker
  // that holds that group receives activations; the others get 0 bytes for the whole run.
  if (session().size() < 3) GTEST_SKIP() << "needs 2 or more worker ranks";
  const Bundle b = load_bundle_manifest(make_bundle("idle", "per_request", false));
  auto m = Model::load(base_dir(), DType::F32);
  RemoteExperts* remote = nullptr;
  auto pool = make_pool(b, *m, &remote);
  m->set_experts(pool.get());
  const Placement p = plan_placement(b, session().size() - 1);
  const int g = int(seed() % b.groups.size());
  int owner = -1;
  for (int w = 0; w < p.n_workers(); ++w)
    for (int x : p.groups[size_t(w)])
      if (x == g) owner = w;
  ASSERT_GE(owner, 0);
  const auto before = remote->worker_stats();
  GenerateRequest r;
  r.prompt = toks(11, seed() + 40);
  r.max_tokens = 6;
  r.sampling.temperature = 0;
  r.ignore_eos = true;
  r.routing.pin = {{b.groups[size_t(g)].name, 1.0}};
  (void)Engine(*m).run({r});
  const auto after = remote->worker_stats();
  for (int w = 0; w < p.n_workers(); ++w) {
    const int64_t dbytes = after[size_t(w)].at("data_bytes_received").get<int64_t>() -
                           before[size_t(w)].at("data_bytes_received").get<int64_t>();
    const int64_t dmsg =
        after[size_t(w)].at("work_messages").get<int64_t>() - before[size_t(w)].at("work_messages").get<int64_t>();
    if (w == owner) {
      EXPECT_GT(dbytes, 0) << "rank " << w + 1 << " holds group " << b.groups[size_t(g)].name;
      // 3 layers x 4 inputs, prefill + 5 decode steps.
      EXPECT_EQ(dmsg, 3 * 4 * 6);
    } else {
      EXPECT_EQ(dbytes, 0) << "rank " << w + 1 << " holds none of the request's experts";
      EXPECT_EQ(dmsg, 0);
    }
  }
  m->set_experts(nullptr);
}

TEST(DistributedWork, PlacementBalancesBytesAndRefusesTooManyRanks) {
  const Bundle b = load_bundle_manifest(make_bundle("place", "per_request", true));
  const Placement p = plan_placement(b, 2);
  int units = 0;
  for (const auto& g : p.groups) units += int(g.size());
  EXPECT_EQ(units, 4);
  EXPECT_GE(p.general_worker, 0);
  EXPECT_EQ(p.bytes.size(), 2u);
  for (auto by : p.bytes) EXPECT_GT(by, 0);
  try {
    plan_placement(b, 6);
    ADD_FAILURE() << "6 workers for 5 units accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("run at most 6 ranks"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace atmoe::test

// Rank 0 runs the tests; the other ranks serve experts until rank 0's final shutdown.
class MpiEnvironment : public ::testing::Environment {
 public:
  void TearDown() override {
    if (auto* s = atmoe::MpiSession::get()) atmoe::end_workers(*s, 0);
  }
};

int main(int argc, char** argv) {
  atmoe::MpiSession& s = atmoe::MpiSession::init(&argc, &argv);
  if (s.rank() > 0) {
    const int code = atmoe::run_worker(s);
    s.finalize();
    return code;
  }
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::AddGlobalTestEnvironment(new MpiEnvironment);
  const int rc = RUN_ALL_TESTS();
  s.finalize();
  return rc;
}
