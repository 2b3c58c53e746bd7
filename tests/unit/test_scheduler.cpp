// Scheduler: a request's tokens do not depend on what it was batched with, admission keeps
// the KV budget and the order, the queue bound, cancellation of waiting and running
// requests, and bad requests refused alone at submit. Synthetic llama model, f32, greedy.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <set>

#include "common/error.h"
#include "coordinator/model.h"
#include "coordinator/scheduler.h"
#include "coordinator/synth_model.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;

Model& model() {
  static std::unique_ptr<Model> m = [] {
    const std::string dir = (fs::temp_directory_path() / ("atmoe_sched_" + std::to_string(::getpid()))).string();
    SynthModelOptions o;
    o.arch = "llama";
    o.out = dir;
    o.seed = 5;
    o.layers = 2;
    o.vocab = 300;
    o.max_position = 256;
    synth_model(o);
    auto p = Model::load(dir, DType::F32);
    fs::remove_all(dir);
    return p;
  }();
  return *m;
}

GenerateRequest req(int n_prompt, uint64_t seed, int max_tokens) {
  std::mt19937_64 rng(seed);
  GenerateRequest r;
  for (int i = 0; i < n_prompt; ++i) r.prompt.push_back(int32_t(rng() % 290));
  r.max_tokens = max_tokens;
  r.ignore_eos = true;  // greedy to max_tokens: every request has a known length
  return r;
}

struct Done {
  std::map<RequestId, GenerateResult> results;
  std::map<RequestId, std::string> streamed;
  std::vector<RequestId> order;  // finish order
};

RequestId submit(Scheduler& s, const GenerateRequest& r, Done& d) {
  auto id = std::make_shared<RequestId>(0);
  RequestEvents ev;
  ev.on_text = [&d, id](const std::string& t) { d.streamed[*id] += t; };
  ev.on_finish = [&d, id](const GenerateResult& g) {
    EXPECT_EQ(d.results.count(*id), 0u) << "on_finish twice for request " << *id;
    d.results[*id] = g;
    d.order.push_back(*id);
  };
  *id = s.submit(r, std::move(ev));  // max_tokens 0 finishes inside submit: id is 0 then
  return *id;
}

std::vector<int32_t> solo(const GenerateRequest& r) {
  Scheduler s(model());
  Done d;
  submit(s, r, d);
  while (s.step()) {
  }
  EXPECT_EQ(d.results.size(), 1u);
  return d.results.begin()->second.tokens;
}

TEST(Scheduler, TokensDoNotDependOnTheBatch) {
  // Five requests of different lengths through a small step budget (chunked prefill) and
  // two running slots (the rest wait): each gets the tokens it gets alone, and the text
  // streamed through on_text is its final text.
  std::vector<GenerateRequest> rs;
  for (int i = 0; i < 5; ++i) rs.push_back(req(3 + 7 * i, 100 + i, 6 + i));
  SchedulerOptions o;
  o.max_batch_tokens = 9;
  o.max_running = 2;
  Scheduler s(model(), o);
  Done d;
  std::vector<RequestId> ids;
  for (const auto& r : rs) ids.push_back(submit(s, r, d));
  size_t max_running = 0, max_waiting = 0;
  int steps = 0;
  while (s.step()) {
    max_running = std::max(max_running, s.running());
    max_waiting = std::max(max_waiting, s.waiting());
    EXPECT_LE(s.last_step_tokens(), 9) << "step " << steps;
    ASSERT_LT(++steps, 1000);
  }
  EXPECT_LE(max_running, 2u);
  EXPECT_GE(max_waiting, 1u);
  ASSERT_EQ(d.results.size(), rs.size());
  for (size_t i = 0; i < rs.size(); ++i) {
    const GenerateResult& g = d.results.at(ids[i]);
    EXPECT_EQ(g.tokens, solo(rs[i])) << "request " << i;
    EXPECT_EQ(int(g.tokens.size()), rs[i].max_tokens);
    EXPECT_EQ(g.finish_reason, "length");
    EXPECT_EQ(g.prompt_tokens, int64_t(rs[i].prompt.size()));
    EXPECT_EQ(d.streamed[ids[i]], g.text);
  }
  EXPECT_EQ(s.kv_reserved_bytes(), 0);
  EXPECT_TRUE(s.idle());
}

TEST(Scheduler, KvBudgetAdmitsInOrderAndNeverOvercommits) {
  SchedulerOptions o;
  Scheduler probe(model(), {});
  const int64_t one = probe.kv_bytes(40 + 10);
  o.kv_budget_bytes = 2 * one + one / 2;  // room for two requests of 50 tokens, not three
  Scheduler s(model(), o);
  Done d;
  std::vector<RequestId> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(submit(s, req(40, 200 + i, 10), d));
  int steps = 0;
  while (s.step()) {
    EXPECT_LE(s.running(), 2u);
    EXPECT_LE(s.kv_reserved_bytes(), o.kv_budget_bytes);
    ASSERT_LT(++steps, 1000);
  }
  ASSERT_EQ(d.results.size(), 5u);
  EXPECT_EQ(d.order, ids);  // equal lengths, admitted in order: they finish in order
  // A request that could never fit is refused at submit, naming the budget; the
  // scheduler goes on.
  try {
    submit(s, req(200, 1, 50), d);
    FAIL() << "a request over the whole KV budget was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("KV cache"), std::string::npos) << e.what();
  }
  const RequestId id = submit(s, req(10, 2, 3), d);
  while (s.step()) {
  }
  EXPECT_EQ(d.results.at(id).tokens.size(), 3u);
}

TEST(Scheduler, AFullQueueIsRefused) {
  SchedulerOptions o;
  o.max_queue = 2;
  Scheduler s(model(), o);
  Done d;
  submit(s, req(5, 1, 2), d);
  submit(s, req(5, 2, 2), d);
  EXPECT_THROW(submit(s, req(5, 3, 2), d), QueueFull);
  EXPECT_EQ(s.waiting(), 2u);
  ASSERT_TRUE(s.step());  // both admitted: the queue has room again
  EXPECT_EQ(s.waiting(), 0u);
  submit(s, req(5, 3, 2), d);
  while (s.step()) {
  }
  EXPECT_EQ(d.results.size(), 3u);
}

TEST(Scheduler, CancelEndsWaitingAndRunningRequestsAlone) {
  SchedulerOptions o;
  o.max_running = 2;
  Scheduler s(model(), o);
  Done d;
  const auto a = req(6, 11, 12), b = req(9, 12, 12), c = req(4, 13, 12);
  const RequestId ia = submit(s, a, d), ib = submit(s, b, d), ic = submit(s, c, d);
  EXPECT_TRUE(s.cancel(ic));  // still waiting (two running slots): ends now, never ran
  ASSERT_EQ(d.results.count(ic), 1u);
  EXPECT_EQ(d.results.at(ic).finish_reason, "cancelled");
  EXPECT_TRUE(d.results.at(ic).tokens.empty());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(s.step());
  EXPECT_TRUE(s.cancel(ib));   // running: settled at the next step boundary
  EXPECT_FALSE(s.cancel(ib));  // once
  EXPECT_FALSE(s.cancel(999));
  while (s.step()) {
  }
  ASSERT_EQ(d.results.size(), 3u);
  const GenerateResult& gb = d.results.at(ib);
  EXPECT_EQ(gb.finish_reason, "cancelled");
  EXPECT_GE(gb.tokens.size(), 1u);
  EXPECT_LT(gb.tokens.size(), 12u);
  const auto full_b = solo(b);
  EXPECT_TRUE(std::equal(gb.tokens.begin(), gb.tokens.end(), full_b.begin()));  // a prefix of its own run
  EXPECT_EQ(d.results.at(ia).tokens, solo(a));  // the other request is untouched
  EXPECT_EQ(d.results.at(ia).finish_reason, "length");
  EXPECT_FALSE(s.cancel(ia));  // finished
  EXPECT_EQ(s.kv_reserved_bytes(), 0);
}

TEST(Scheduler, BadRequestsAreRefusedAloneAtSubmit) {
  Scheduler s(model());
  Done d;
  auto expect_refused = [&](GenerateRequest r, const std::string& field) {
    try {
      submit(s, r, d);
      ADD_FAILURE() << "accepted a request with a bad " << field;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  GenerateRequest r = req(5, 1, 4);
  r.prompt.clear();
  expect_refused(r, "prompt");
  r = req(5, 1, 4);
  r.prompt[2] = 300;  // vocab is 300
  expect_refused(r, "prompt");
  r = req(5, 1, 4);
  r.prompt[0] = -1;
  expect_refused(r, "prompt");
  r = req(5, 1, -5);
  expect_refused(r, "max_tokens");
  r = req(5, 1, 4);
  r.sampling.temperature = std::numeric_limits<float>::quiet_NaN();
  expect_refused(r, "temperature");
  r = req(5, 1, 4);
  r.sampling.top_p = 2;
  expect_refused(r, "top_p");
  r = req(5, 1, 4);
  r.sampling.top_k = -1;
  expect_refused(r, "top_k");
  r = req(250, 1, 10);  // context 256
  expect_refused(r, "context length");
  r = req(5, 1, 4);
  r.sampling.min_p = 1.5f;
  expect_refused(r, "min_p");
  r = req(5, 1, 4);
  r.penalties.presence = 3;
  expect_refused(r, "presence_penalty");
  r = req(5, 1, 4);
  r.penalties.repetition = 0;
  expect_refused(r, "repetition_penalty");
  r = req(5, 1, 4);
  r.logit_bias = {{300, 1.f}};
  expect_refused(r, "logit_bias");
  r = req(5, 1, 4);
  r.logit_bias = {{3, std::numeric_limits<float>::infinity()}};
  expect_refused(r, "logit_bias");
  r = req(5, 1, 4);
  r.logprobs = 21;
  expect_refused(r, "logprobs");
  EXPECT_EQ(s.waiting(), 0u);
  // max_tokens 0 finishes inside submit; a good request still runs.
  submit(s, req(5, 1, 0), d);
  ASSERT_EQ(d.results.size(), 1u);
  EXPECT_EQ(d.results.begin()->second.finish_reason, "length");
  EXPECT_TRUE(d.results.begin()->second.tokens.empty());
  const RequestId id = submit(s, req(5, 1, 4), d);
  while (s.step()) {
  }
  EXPECT_EQ(d.results.at(id).tokens.size(), 4u);
}

// logit_bias, the penalties and logprobs act on what a request generates (greedy, so each
// effect is exact): a +100 bias forces its token; a frequency penalty breaks the repeats of
// the unpenalised run; each token's logprob is the top-1 of its top-k under greedy.
TEST(Scheduler, LogitBiasPenaltiesAndLogprobs) {
  const GenerateRequest base = req(6, 21, 24);
  const std::vector<int32_t> plain = solo(base);
  GenerateRequest biased = base;
  biased.logit_bias = {{123, 100.f}};
  EXPECT_EQ(solo(biased), std::vector<int32_t>(24, 123));
  // The unpenalised greedy run repeats tokens; a strong frequency penalty makes a token
  // that already occurred lose to one that has not, so the repeats fall.
  auto repeats = [](const std::vector<int32_t>& t) {
    return int(t.size()) - int(std::set<int32_t>(t.begin(), t.end()).size());
  };
  ASSERT_GT(repeats(plain), 0) << "the synthetic model's greedy run has no repeats to penalise";
  GenerateRequest pen = base;
  pen.penalties.frequency = 2.f;
  pen.penalties.presence = 2.f;
  const std::vector<int32_t> penalised = solo(pen);
  EXPECT_LT(repeats(penalised), repeats(plain));
  // Repetition penalty 1 and zero penalties: bit-identical to no processing at all.
  GenerateRequest neutral = base;
  neutral.penalties = cpu::LogitPenalties{0.f, 0.f, 1.f};
  EXPECT_EQ(solo(neutral), plain);
  // Logprobs: greedy picks the most probable token, so it heads its own top list.
  GenerateRequest lp = base;
  lp.logprobs = 3;
  Scheduler s(model());
  Done d;
  int streamed_lp = 0;
  RequestEvents ev;
  ev.on_token = [&](int32_t, const cpu::TokenLogprob* p) { streamed_lp += p != nullptr; };
  ev.on_finish = [&](const GenerateResult& g) { d.results[1] = g; };
  s.submit(lp, std::move(ev));
  while (s.step()) {
  }
  const GenerateResult& g = d.results[1];
  EXPECT_EQ(g.tokens, plain);
  ASSERT_EQ(g.logprobs.size(), g.tokens.size());
  EXPECT_EQ(streamed_lp, int(g.tokens.size()));
  for (size_t i = 0; i < g.tokens.size(); ++i) {
    const auto& t = g.logprobs[i];
    ASSERT_EQ(t.top.size(), 3u);
    EXPECT_EQ(t.token, g.tokens[i]);
    EXPECT_EQ(t.top[0].first, g.tokens[i]);
    EXPECT_FLOAT_EQ(t.logprob, t.top[0].second);
    EXPECT_LE(t.top[0].second, 0.f);
    EXPECT_GE(t.top[0].second, t.top[1].second);
    EXPECT_GE(t.top[1].second, t.top[2].second);
    EXPECT_LE(std::exp(t.top[0].second) + std::exp(t.top[1].second) + std::exp(t.top[2].second), 1.0 + 1e-5);
  }
}

// Stop strings: generation stops at the first token that completes any of them, and the
// text ends right before the earliest match among those that token completes (a token may
// complete two; the list's order does not matter). Random pairs of substrings of the
// unstopped greedy text, checked against that rule computed from its token boundaries.
TEST(Scheduler, TheEarliestStopStringEndsTheText) {
  GenerateRequest base = req(5, 77, 40);
  auto run_one = [](const GenerateRequest& r) {
    Scheduler s(model());
    Done d;
    submit(s, r, d);
    while (s.step()) {
    }
    return d.results.begin()->second;
  };
  const GenerateResult plain = run_one(base);
  const std::string& text = plain.text;
  std::vector<size_t> ends;  // byte offset of the end of each token's text
  for (int32_t t : plain.tokens) ends.push_back((ends.empty() ? 0 : ends.back()) + model().tokenizer().token_bytes(t).size());
  ASSERT_EQ(ends.back(), text.size()) << "the synthetic vocabulary decodes token by token";
  std::mt19937_64 rng(test_seed() + 41);
  for (int i = 0; i < 60; ++i) {
    GenerateRequest r = base;
    for (int k = 0; k < 2; ++k) {
      const size_t len = 1 + rng() % 4, pos = rng() % (text.size() - len);
      r.stop.push_back(text.substr(pos, len));
    }
    size_t first_end = std::string::npos;
    for (const auto& st : r.stop) first_end = std::min(first_end, text.find(st) + st.size());
    const size_t token_end = *std::lower_bound(ends.begin(), ends.end(), first_end);
    size_t cut = std::string::npos;
    for (const auto& st : r.stop)
      if (text.find(st) + st.size() <= token_end) cut = std::min(cut, text.find(st));
    const GenerateResult g = run_one(r);
    EXPECT_EQ(g.text, text.substr(0, cut)) << "stop [" << r.stop[0] << "], [" << r.stop[1] << "]";
    EXPECT_EQ(g.finish_reason, "stop");
  }
}

}  // namespace
}  // namespace atmoe::test
