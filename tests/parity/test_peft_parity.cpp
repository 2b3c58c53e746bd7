// Experts against PEFT (goldens from tests/parity/make_peft_goldens.py: torch +
// transformers + peft on a synth-model and a synth-bundle rebuilt here bit for bit):
//   base model              = transformers LlamaForCausalLM
//   --adapter <expert 0>    = PeftModel with that LoRA
//   --pin w0,w1,w2 (one expert per group) = add_weighted_adapter(..., combination_type="cat")
// Relative L2 of the logits of every position <= 1e-4 (f32).
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/bundle.h"
#include "coordinator/experts.h"
#include "coordinator/model.h"
#include "coordinator/synth_bundle.h"
#include "coordinator/synth_model.h"
#include "tests/parity/golden_args.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

TEST(PeftParity, SingleAdapterAndCatMixtureMatchPeft) {
  json g = load_golden("peft_synth.json");
  ASSERT_FALSE(g.is_null()) << "missing goldens";
  const json& ma = g["synth_model_args"];
  const json& ba = g["synth_bundle_args"];
  std::string work = (fs::temp_directory_path() / ("atmoe_peft_" + std::to_string(::getpid()))).string();
  SynthModelOptions mo = synth_model_options(ma, work + "/model");
  synth_model(mo);
  SynthBundleOptions bo;
  bo.base = mo.out;
  bo.out = work + "/bundle";
  bo.groups = std::stoi(cli_arg(ba, "--groups", ""));
  bo.per_group = std::stoi(cli_arg(ba, "--experts-per-group", ""));
  bo.ranks = cli_arg(ba, "--rank", "");
  bo.seed = std::stoull(cli_arg(ba, "--seed", ""));
  bo.b_std = std::stod(cli_arg(ba, "--b-std", ""));
  synth_bundle(bo);
  for (auto& [rel, h] : g["fnv1a64"].items())
    ASSERT_EQ(fnv1a64(work + "/" + rel), h.get<std::string>())
        << rel << " differs from the file the goldens were made from: synth-model/synth-bundle changed; "
        << "rerun tests/parity/make_peft_goldens.py";

  auto m = Model::load(mo.out, DType::F32);
  Bundle b = load_bundle_manifest(bo.out);
  ExpertPool pool(b, m->config());
  m->set_experts(&pool);
  const auto toks = g["tokens"].get<std::vector<int32_t>>();
  const int64_t V = m->config().vocab, T = int64_t(toks.size());
  auto logits = [&](SeqRouting* r) {
    auto c = m->new_cache();
    std::vector<float> lg;
    m->forward({{c.get(), toks.data(), T, LogitsMode::All, r}}, lg);
    return lg;
  };
  auto check = [&](const char* name, const std::vector<float>& got) {
    const auto want = g[name].get<std::vector<double>>();
    ASSERT_EQ(want.size(), size_t(T * V));
    const double worst = worst_row_rel_l2(got, want, T, V);
    std::printf("%s: worst relative L2 over %lld positions %.3g\n", name, (long long)T, worst);
    EXPECT_LE(worst, 1e-4) << name;
  };
  check("base", logits(nullptr));
  RoutingControls single;
  single.adapter = g["experts"][0].get<std::string>();
  auto rs = pool.new_routing(single);
  check("single", logits(rs.get()));
  RoutingControls cat;
  for (size_t i = 0; i < b.groups.size(); ++i) cat.pin[b.groups[i].name] = g["cat_weights"][i].get<double>();
  auto rc = pool.new_routing(cat);
  check("cat", logits(rc.get()));
}

}  // namespace
}  // namespace atmoe::test
