// T-REX against a direct torch transcription of DESIGN.md 1.2 (goldens from
// tests/parity/make_trex_goldens.py, float64): rank1_flex with a router mapper and the
// intuition from a base layer's pooled hidden state; rank1 with a request embedding.
// The synth-model and bundles are rebuilt here bit for bit (hashes checked first).
// Relative L2 of the logits of every position <= 1e-4 (f32).
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/bundle.h"
#include "coordinator/model.h"
#include "coordinator/synth_bundle.h"
#include "coordinator/synth_model.h"
#include "coordinator/trex_pool.h"
#include "tests/parity/golden_args.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

TEST(TrexParity, MatchesTorchTranscription) {
  json g = load_golden("trex_synth.json");
  ASSERT_FALSE(g.is_null()) << "missing goldens";
  const std::string work = (fs::temp_directory_path() / ("atmoe_trexp_" + std::to_string(::getpid()))).string();
  const json& ma = g["synth_model_args"];
  SynthModelOptions mo = synth_model_options(ma, work + "/model");
  synth_model(mo);
  const auto toks = g["tokens"].get<std::vector<int32_t>>();
  for (auto& [name, cs] : g["cases"].items()) {
    const json& ba = cs["synth_bundle_args"];
    SynthBundleOptions bo;
    bo.base = mo.out;
    bo.out = work + "/" + name;
    bo.method = "t-rex";
    bo.trex_mode = cli_arg(ba, "--trex-mode", "rank1_flex");
    bo.ranks = cli_arg(ba, "--rank", "8");
    bo.router_mapping = cli_flag(ba, "--router-mapping");
    bo.intuition = cli_arg(ba, "--intuition", "hidden_state");
    bo.intuition_layer = std::stoi(cli_arg(ba, "--intuition-layer", "-1"));
    bo.embedding_dim = std::stoi(cli_arg(ba, "--embedding-dim", "64"));
    bo.targets = cli_arg(ba, "--targets", bo.targets);
    bo.seed = std::stoull(cli_arg(ba, "--seed", "0"));
    bo.b_std = std::stod(cli_arg(ba, "--b-std", "0.02"));
    synth_bundle(bo);
  }
  for (auto& [rel, h] : g["fnv1a64"].items())
    ASSERT_EQ(fnv1a64(work + "/" + rel), h.get<std::string>()) << rel << ": generator changed; rerun make_trex_goldens.py";
  for (auto& [name, cs] : g["cases"].items()) {
    auto m = Model::load(mo.out, DType::F32);
    Bundle b = load_bundle_manifest(work + "/" + name);
    TrexPool pool(b, m->config(), DType::F32);
    m->set_experts(&pool);
    RoutingControls c;
    if (!b.trex->intuition_from_hidden) c.intuition_embedding = g["embedding"].get<std::vector<float>>();
    auto r = pool.new_routing(c);
    auto cache = m->new_cache();
    std::vector<float> lg;
    m->forward({{cache.get(), toks.data(), int64_t(toks.size()), LogitsMode::All, r.get()}}, lg);
    const auto want = cs["logits"].get<std::vector<double>>();
    ASSERT_EQ(want.size(), lg.size());
    const int64_t V = m->config().vocab, T = int64_t(toks.size());
    const double worst = worst_row_rel_l2(lg, want, T, V);
    std::printf("%s: worst relative L2 over %lld positions %.3g\n", name.c_str(), (long long)T, worst);
    EXPECT_LE(worst, 1e-4) << name;
    // The experts move the logits as much as in the reference: base logits from routing off.
    auto r0 = pool.new_routing([] {
      RoutingControls off;
      off.off = true;
      return off;
    }());
    auto cache0 = m->new_cache();
    std::vector<float> base;
    m->forward({{cache0.get(), toks.data(), int64_t(toks.size()), LogitsMode::All, r0.get()}}, base);
    double num = 0, den = 0;
    for (size_t i = 0; i < lg.size(); ++i) num += (double(lg[i]) - base[i]) * (double(lg[i]) - base[i]), den += double(base[i]) * base[i];
    const double change = std::sqrt(num / den), want_change = cs["rel_change"].get<double>();
    std::printf("%s: experts change the logits by %.4g (reference %.4g)\n", name.c_str(), change, want_change);
    EXPECT_GT(want_change, 1e-2) << name << ": the reference experts barely move the logits";
    EXPECT_NEAR(change, want_change, 1e-3 * want_change) << name;
  }
}

}  // namespace
}  // namespace atmoe::test
