#include "coordinator/engine.h"

#include <algorithm>
#include <memory>
#include <random>

#include "common/error.h"

namespace atmoe {

namespace {
struct Seq {
  size_t idx;
  const GenerateRequest* req;
  std::unique_ptr<KvCache> cache;
  int64_t prefilled = 0;  // prompt tokens already in the cache
  int32_t next = -1;      // sampled token not yet fed
  std::mt19937_64 rng;
  std::unique_ptr<StreamDecoder> dec;
  std::shared_ptr<SeqRouting> routing;
  size_t emitted = 0;
  size_t holdback = 0;
  bool done = false;
};
}  // namespace

std::vector<GenerateResult> Engine::run(const std::vector<GenerateRequest>& reqs,
                                        const std::function<void(size_t, const std::string&)>& on_text) {
  const Tokenizer& tok = m_.tokenizer();
  const int64_t V = m_.config().vocab;
  std::vector<GenerateResult> out(reqs.size());
  std::vector<std::unique_ptr<Seq>> waiting, running;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& r = reqs[i];
    ATMOE_CHECK_INPUT(!r.prompt.empty(), "request {}: empty prompt", i);
    ATMOE_CHECK_INPUT(r.max_tokens >= 0, "request {}: max_tokens must be >= 0", i);
    ATMOE_CHECK_INPUT(r.sampling.temperature >= 0, "request {}: temperature must be >= 0", i);
    ATMOE_CHECK_INPUT(r.sampling.top_p > 0 && r.sampling.top_p <= 1, "request {}: top_p must be in (0, 1]", i);
    ATMOE_CHECK_INPUT(r.sampling.top_k >= 0, "request {}: top_k must be >= 0", i);
    ATMOE_CHECK_INPUT(int64_t(r.prompt.size()) + r.max_tokens <= m_.config().max_position,
                      "request {}: prompt ({} tokens) + max_tokens ({}) exceeds the context length {}", i,
                      r.prompt.size(), r.max_tokens, m_.config().max_position);
    out[i].prompt_tokens = int64_t(r.prompt.size());
    auto s = std::make_unique<Seq>();
    s->idx = i;
    s->req = &r;
    s->rng.seed(r.seed);
    s->dec = std::make_unique<StreamDecoder>(tok);
    for (const auto& st : r.stop) s->holdback = std::max(s->holdback, st.empty() ? 0 : st.size() - 1);
    if (m_.experts() && r.use_experts) {
      s->routing = std::shared_ptr<SeqRouting>(m_.experts()->new_routing(r.routing).release());
      s->routing->trace_tokens = r.trace_tokens;
      out[i].routing = s->routing;
    }
    if (r.max_tokens == 0) {
      out[i].finish_reason = "length";
      continue;
    }
    waiting.push_back(std::move(s));
  }
  std::reverse(waiting.begin(), waiting.end());  // pop_back serves requests in order

  std::vector<ForwardItem> items;
  std::vector<Seq*> owners;
  std::vector<float> logits;
  std::vector<std::pair<float, int32_t>> scratch;

  auto emit = [&](Seq& s, bool final) {
    GenerateResult& r = out[s.idx];
    size_t safe = final ? r.text.size() : (r.text.size() > s.holdback ? r.text.size() - s.holdback : 0);
    if (safe > s.emitted) {
      if (on_text) on_text(s.idx, r.text.substr(s.emitted, safe - s.emitted));
      s.emitted = safe;
    }
  };
  auto finish = [&](Seq& s, const char* why) {
    s.done = true;
    out[s.idx].text += s.dec->flush();
    out[s.idx].finish_reason = why;
    emit(s, true);
    s.cache.reset();
  };

  while (!waiting.empty() || !running.empty()) {
    items.clear();
    owners.clear();
    int64_t budget = o_.max_batch_tokens;
    for (auto& s : running) {
      if (s->prefilled < int64_t(s->req->prompt.size())) continue;
      items.push_back({s->cache.get(), &s->next, 1, LogitsMode::Last, s->routing.get()});
      owners.push_back(s.get());
      --budget;
    }
    // Admit and prefill (chunked) while budget and slots remain.
    for (auto& s : running) {
      int64_t left = int64_t(s->req->prompt.size()) - s->prefilled;
      if (left <= 0 || budget <= 0) continue;
      int64_t n = std::min(left, budget);
      items.push_back({s->cache.get(), s->req->prompt.data() + s->prefilled, n, n == left ? LogitsMode::Last : LogitsMode::None,
                       s->routing.get()});
      owners.push_back(s.get());
      budget -= n;
    }
    while (!waiting.empty() && budget > 0 && int(running.size()) < o_.max_running) {
      auto s = std::move(waiting.back());
      waiting.pop_back();
      s->cache = m_.new_cache();
      int64_t left = int64_t(s->req->prompt.size());
      // per_request routing needs the whole prompt in one forward (its mean is the router input).
      const bool whole = s->routing && m_.experts()->needs_whole_prompt();
      int64_t n = whole ? left : std::min(left, budget);
      items.push_back({s->cache.get(), s->req->prompt.data(), n, n == left ? LogitsMode::Last : LogitsMode::None,
                       s->routing.get()});
      owners.push_back(s.get());
      budget -= n;
      running.push_back(std::move(s));
    }
    ATMOE_ASSERT(!items.empty());
    m_.forward(items, logits);

    size_t row = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      Seq& s = *owners[i];
      if (items[i].tokens != &s.next) s.prefilled += items[i].n;
      if (items[i].logits == LogitsMode::None) continue;
      const float* lg = logits.data() + row * size_t(V);
      ++row;
      int32_t tk = cpu::sample(lg, V, s.req->sampling, s.rng, scratch);
      GenerateResult& r = out[s.idx];
      if (!s.req->ignore_eos && tok.is_eog(tk)) {
        finish(s, "stop");
        continue;
      }
      r.tokens.push_back(tk);
      size_t before = r.text.size();
      r.text += s.dec->push(tk);
      // Stop strings: search only where a new match can start.
      bool stopped = false;
      for (const auto& st : s.req->stop) {
        if (st.empty()) continue;
        size_t from = before >= st.size() ? before - st.size() + 1 : 0;
        size_t at = r.text.find(st, from);
        if (at != std::string::npos) {
          r.text.resize(at);
          s.emitted = std::min(s.emitted, at);
          stopped = true;
          break;
        }
      }
      if (stopped) {
        s.dec->flush();
        s.done = true;
        r.finish_reason = "stop";
        emit(s, true);
        s.cache.reset();
        continue;
      }
      if (int(r.tokens.size()) >= s.req->max_tokens) {
        finish(s, "length");
        continue;
      }
      s.next = tk;
      emit(s, false);
    }
    running.erase(std::remove_if(running.begin(), running.end(), [](auto& s) { return s->done; }), running.end());
  }
  return out;
}

}  // namespace atmoe
