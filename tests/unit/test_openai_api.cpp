// The OpenAI request parser (apps/openai_api.cpp) under random bodies: thousands of bodies
// built from the real fields with values of every type and range, plus byte mutations of
// valid JSON. Each is either refused with an InputError naming a body field (never another
// exception, never a crash), or accepted as a request the scheduler takes as it is and that
// keeps every bound (prompt in the vocabulary, prompt + max_tokens within the context,
// finite sampling values in range, n 1..8, logprobs -1..20). Synthetic model and bundle,
// fresh random inputs per run (ATMOE_TEST_SEED).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <random>

#include "apps/openai_api.h"
#include "common/bundle.h"
#include "common/error.h"
#include "coordinator/experts.h"
#include "coordinator/model.h"
#include "coordinator/scheduler.h"
#include "coordinator/synth_bundle.h"
#include "coordinator/synth_model.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

struct World {
  std::string dir;
  std::unique_ptr<Model> model;
  std::unique_ptr<Bundle> bundle;
  std::unique_ptr<ExpertPool> pool;
  app::ServedModels sm;
};

World& world() {
  static World w = [] {
    World x;
    x.dir = (fs::temp_directory_path() / ("atmoe_openai_" + std::to_string(::getpid()))).string();
    SynthModelOptions mo;
    mo.arch = "llama";
    mo.out = x.dir + "/m";
    mo.seed = 3;
    mo.layers = 2;
    mo.vocab = 300;
    mo.max_position = 128;
    synth_model(mo);
    SynthBundleOptions bo;
    bo.base = mo.out;
    bo.out = x.dir + "/b";
    bo.groups = 3;
    bo.per_group = 2;
    bo.seed = 4;
    synth_bundle(bo);
    x.model = Model::load(mo.out, DType::F32);
    x.bundle = std::make_unique<Bundle>(load_bundle_manifest(bo.out));
    x.pool = std::make_unique<ExpertPool>(*x.bundle, x.model->config(), DType::F32);
    x.model->set_experts(x.pool.get());
    x.sm = app::served_models(*x.model, x.bundle.get());
    return x;
  }();
  return w;
}

// A random JSON value of any type, sometimes one a field expects.
json any_value(std::mt19937_64& r, int depth = 0) {
  switch (r() % 12) {
    case 0: return nullptr;
    case 1: return bool(r() & 1);
    case 2: return int64_t(r() % 41) - 20;
    case 3: return std::uniform_real_distribution<double>(-3, 3)(r);
    case 4: return int64_t(r());  // huge
    case 5: return -int64_t(r() >> 1);
    case 6: return std::string(r() % 5, char('a' + r() % 26));
    case 7: return json::array();
    case 8: return depth < 2 ? json::array({any_value(r, depth + 1), any_value(r, depth + 1)}) : json(1);
    case 9: return depth < 2 ? json{{"type", "text"}, {"k", any_value(r, depth + 1)}} : json(0);
    case 10: return 1e300;
    default: return uint64_t(r() % 3);
  }
}

json random_body(std::mt19937_64& r, app::Endpoint ep, const World& w) {
  json b = json::object();
  const std::vector<std::string> models = {w.sm.bundle_id, w.sm.base_id, w.bundle->experts[0].name, "nope"};
  if (r() % 10) b["model"] = models[r() % models.size()];
  if (ep == app::Endpoint::ChatCompletions) {
    if (r() % 8) {
      json msgs = json::array();
      const char* roles[] = {"system", "user", "assistant", "developer", "wizard"};
      for (uint64_t i = 0, n = 1 + r() % 3; i < n; ++i)
        msgs.push_back(r() % 6 ? json{{"role", roles[r() % 5]}, {"content", r() % 5 ? json("hello there") : any_value(r)}}
                               : any_value(r));
      b["messages"] = msgs;
    }
  } else if (r() % 8) {
    switch (r() % 4) {
      case 0: b["prompt"] = "the quick brown fox"; break;
      case 1: b["prompt"] = json::array({int64_t(r() % 320) - 10, int64_t(r() % 300)}); break;
      case 2: b["prompt"] = std::string(size_t(r() % 600), 'a'); break;
      default: b["prompt"] = any_value(r);
    }
  }
  const char* fields[] = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                          "stop", "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                          "logprobs", "top_logprobs", "ignore_eos", "stream", "stream_options", "routing",
                          "routing_trace", "user", "echo", "best_of", "response_format", "n_predict"};
  for (const char* f : fields) {
    if (r() % 4) continue;
    const std::string k = f;
    if (k == "routing" && r() % 2) {
      json rt = json::object();
      const char* ctl[] = {"pin", "mask", "top_k_groups", "tau_group", "lambda", "off", "adapter", "bogus"};
      const std::string c = ctl[r() % 8];
      rt[c] = c == "pin" ? json{{w.bundle->groups[r() % 3].name, any_value(r)}}
              : c == "mask" ? json::array({r() % 2 ? w.bundle->experts[1].name : "x"})
                            : any_value(r);
      b[k] = rt;
    } else if (k == "logit_bias" && r() % 2) {
      b[k] = {{std::to_string(int64_t(r() % 320) - 5), any_value(r)}};
    } else if (k == "stream_options" && r() % 2) {
      b[k] = {{"include_usage", any_value(r)}};
    } else if (r() % 3) {  // mostly a value the field takes
      static const std::map<std::string, std::vector<json>> good = {
          {"max_tokens", {1, 5, 40}}, {"max_completion_tokens", {3}}, {"temperature", {0, 0.7, 2}},
          {"top_p", {0.5, 1}}, {"top_k", {-1, 0, 5}}, {"min_p", {0, 0.1}}, {"seed", {0, -3, 12345}},
          {"stop", {"a", json::array({"b", "cd"})}}, {"n", {1, 3, 8}}, {"presence_penalty", {0, 1.5, -2}},
          {"frequency_penalty", {0, 0.5}}, {"repetition_penalty", {1, 1.2}}, {"logit_bias", {json::object()}},
          {"logprobs", {0, 3, false}}, {"top_logprobs", {0}}, {"ignore_eos", {true, false}},
          {"stream", {false, true}}, {"stream_options", {nullptr}}, {"routing", {json::object()}},
          {"routing_trace", {false}}, {"user", {"u1"}}, {"echo", {false}}, {"best_of", {1}},
          {"response_format", {json{{"type", "text"}}}}, {"n_predict", {nullptr}}};
      const auto& v = good.at(k);
      b[k] = v[r() % v.size()];
    } else {
      b[k] = any_value(r);
    }
  }
  return b;
}

void check_one(const json& body, app::Endpoint ep, int& accepted, int& refused) {
  World& w = world();
  try {
    const app::OpenAiRequest q = app::parse_openai_request(body, ep, *w.model, w.sm, 7);
    const GenerateRequest& g = q.gen;
    const ModelConfig& c = w.model->config();
    ASSERT_FALSE(g.prompt.empty()) << body.dump();
    for (int32_t t : g.prompt) ASSERT_TRUE(t >= 0 && t < c.vocab) << body.dump();
    ASSERT_GE(g.max_tokens, 1) << body.dump();
    ASSERT_LE(int64_t(g.prompt.size()) + g.max_tokens, c.max_position) << body.dump();
    ASSERT_TRUE(std::isfinite(g.sampling.temperature) && g.sampling.temperature >= 0 && g.sampling.temperature <= 2);
    ASSERT_TRUE(g.sampling.top_p > 0 && g.sampling.top_p <= 1 && g.sampling.min_p >= 0 && g.sampling.min_p <= 1);
    ASSERT_TRUE(q.n >= 1 && q.n <= app::kMaxChoices && g.logprobs >= -1 && g.logprobs <= 20) << body.dump();
    // What the parser accepts, the scheduler takes unchanged.
    Scheduler s(*w.model);
    s.submit(g, {});
    ++accepted;
  } catch (const InputError& e) {
    const std::string m = e.what();
    ASSERT_TRUE(m.rfind("body", 0) == 0 || m.rfind("routing:", 0) == 0) << "an error that names no field: " << m
                                                                          << "\n  body: " << body.dump();
    ++refused;
  }
}

TEST(OpenAiRequest, RandomBodiesAreRefusedNamingAFieldOrAcceptedWithinBounds) {
  std::mt19937_64 r(test_seed() + 31);
  int accepted = 0, refused = 0;
  for (int i = 0; i < 4000; ++i) {
    const auto ep = r() % 2 ? app::Endpoint::ChatCompletions : app::Endpoint::Completions;
    check_one(random_body(r, ep, world()), ep, accepted, refused);
    if (HasFatalFailure()) return;
  }
  // Both outcomes are exercised (the generator is not all-bad or all-good).
  EXPECT_GT(accepted, 100);
  EXPECT_GT(refused, 1000);
}

TEST(OpenAiRequest, MutatedValidBodiesNeverEscapeAsOtherErrors) {
  std::mt19937_64 r(test_seed() + 32);
  const std::string valid = json{{"model", world().sm.bundle_id},
                                 {"prompt", "the quick brown fox"},
                                 {"max_tokens", 5},
                                 {"temperature", 0.5},
                                 {"logit_bias", {{"5", 2}}},
                                 {"routing", {{"top_k_groups", 1}}}}
                                .dump();
  int accepted = 0, refused = 0, not_json = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string s = valid;
    for (uint64_t m = 0, n = 1 + r() % 4; m < n; ++m) {
      const size_t at = r() % s.size();
      switch (r() % 3) {
        case 0: s[at] = char(r() % 256); break;
        case 1: s.erase(at, 1); break;
        default: s.insert(at, 1, "{}[]\",:0-e.9"[r() % 12]);
      }
    }
    const json body = json::parse(s, nullptr, false);
    if (body.is_discarded()) {
      ++not_json;
      continue;
    }
    check_one(body, app::Endpoint::Completions, accepted, refused);
    if (HasFatalFailure()) return;
  }
  EXPECT_GT(accepted + refused, 300);
}

}  // namespace
}  // namespace atmoe::test
