#include "coordinator/scheduler.h"

#include <algorithm>
#include <cmath>


namespace atmoe {

struct Scheduler::Seq {
  RequestId id = 0;
  GenerateRequest req;
  RequestEvents ev;
  GenerateResult out;
  std::unique_ptr<KvCache> cache;
  int64_t prefilled = 0;  // prompt tokens already in the cache
  int32_t next = -1;      // sampled token not yet fed
  std::mt19937_64 rng;
  std::unique_ptr<StreamDecoder> dec;
  std::shared_ptr<SeqRouting> routing;
  std::vector<int32_t> counts;     // [V] output token counts (penalties only)
  std::vector<uint8_t> in_prompt;  // [V] (repetition penalty only)
  size_t emitted = 0, holdback = 0;
  bool done = false, cancelled = false;
};

Scheduler::Scheduler(Model& m, SchedulerOptions o) : m_(m), o_(o) {
  ATMOE_CHECK_INPUT(o_.max_batch_tokens >= 1, "max_batch_tokens {}: must be >= 1", o_.max_batch_tokens);
  ATMOE_CHECK_INPUT(o_.max_running >= 1, "max_running {}: must be >= 1", o_.max_running);
  ATMOE_CHECK_INPUT(o_.kv_budget_bytes >= 1, "kv_budget_bytes {}: must be >= 1", o_.kv_budget_bytes);
}

Scheduler::~Scheduler() = default;

int64_t Scheduler::kv_bytes(int64_t n_tokens) const {
  // What KvCache::reserve allocates on a fresh cache (at least 64 positions).
  const ModelConfig& c = m_.config();
  const int64_t cap = std::min<int64_t>(c.max_position, std::max<int64_t>(n_tokens, 64));
  return int64_t(c.n_layers) * 2 * cap * int64_t(c.n_kv_heads) * c.head_dim * int64_t(sizeof(float));
}

RequestId Scheduler::submit(GenerateRequest r, RequestEvents ev) {
  const ModelConfig& c = m_.config();
  ATMOE_CHECK_INPUT(!r.prompt.empty(), "prompt: empty (at least one token is needed)");
  for (int32_t t : r.prompt)
    ATMOE_CHECK_INPUT(t >= 0 && t < c.vocab, "prompt: token id {} outside the vocabulary [0, {})", t, c.vocab);
  ATMOE_CHECK_INPUT(r.max_tokens >= 0, "max_tokens {}: must be >= 0", r.max_tokens);
  ATMOE_CHECK_INPUT(std::isfinite(r.sampling.temperature) && r.sampling.temperature >= 0,
                    "temperature {}: must be a finite number >= 0", r.sampling.temperature);
  ATMOE_CHECK_INPUT(std::isfinite(r.sampling.top_p) && r.sampling.top_p > 0 && r.sampling.top_p <= 1,
                    "top_p {}: must be in (0, 1]", r.sampling.top_p);
  ATMOE_CHECK_INPUT(r.sampling.top_k >= 0, "top_k {}: must be >= 0", r.sampling.top_k);
  ATMOE_CHECK_INPUT(std::isfinite(r.sampling.min_p) && r.sampling.min_p >= 0 && r.sampling.min_p <= 1,
                    "min_p {}: must be in [0, 1]", r.sampling.min_p);
  const cpu::LogitPenalties& pen = r.penalties;
  ATMOE_CHECK_INPUT(std::isfinite(pen.presence) && std::abs(pen.presence) <= 2, "presence_penalty {}: must be in [-2, 2]",
                    pen.presence);
  ATMOE_CHECK_INPUT(std::isfinite(pen.frequency) && std::abs(pen.frequency) <= 2,
                    "frequency_penalty {}: must be in [-2, 2]", pen.frequency);
  ATMOE_CHECK_INPUT(std::isfinite(pen.repetition) && pen.repetition > 0 && pen.repetition <= 100,
                    "repetition_penalty {}: must be in (0, 100]", pen.repetition);
  for (const auto& [t, b] : r.logit_bias) {
    ATMOE_CHECK_INPUT(t >= 0 && t < c.vocab, "logit_bias: token id {} outside the vocabulary [0, {})", t, c.vocab);
    ATMOE_CHECK_INPUT(std::isfinite(b) && std::abs(b) <= 100, "logit_bias[{}] {}: must be in [-100, 100]", t, b);
  }
  ATMOE_CHECK_INPUT(r.logprobs >= -1 && r.logprobs <= 20, "logprobs {}: must be in 0..20", r.logprobs);
  const int64_t total = int64_t(r.prompt.size()) + r.max_tokens;
  ATMOE_CHECK_INPUT(total <= c.max_position,
                    "prompt ({} tokens) + max_tokens ({}) exceeds the context length {}", r.prompt.size(),
                    r.max_tokens, c.max_position);
  const int64_t need = kv_bytes(total);
  ATMOE_CHECK_INPUT(need <= o_.kv_budget_bytes,
                    "prompt ({} tokens) + max_tokens ({}) need {:.1f} MiB of KV cache, more than the whole budget "
                    "({:.1f} MiB): lower max_tokens or raise the KV budget",
                    r.prompt.size(), r.max_tokens, double(need) / (1 << 20), double(o_.kv_budget_bytes) / (1 << 20));
  if (waiting_.size() >= o_.max_queue)
    throw QueueFull(fmt::format("the queue is full ({} requests waiting)", waiting_.size()));
  auto s = std::make_unique<Seq>();
  s->id = next_id_++;
  s->rng.seed(r.seed);
  s->dec = std::make_unique<StreamDecoder>(m_.tokenizer());
  for (const auto& st : r.stop) s->holdback = std::max(s->holdback, st.empty() ? 0 : st.size() - 1);
  // Routing state now: a control the bundle refuses fails this request here, alone.
  if (m_.experts() && r.use_experts) {
    s->routing = std::shared_ptr<SeqRouting>(m_.experts()->new_routing(r.routing).release());
    s->routing->trace_tokens = r.trace_tokens;
    s->out.routing = s->routing;
  }
  s->out.prompt_tokens = int64_t(r.prompt.size());
  if (r.penalties.active()) {
    s->counts.assign(size_t(c.vocab), 0);
    if (r.penalties.repetition != 1.f) {
      s->in_prompt.assign(size_t(c.vocab), 0);
      for (int32_t t : r.prompt) s->in_prompt[size_t(t)] = 1;
    }
  }
  s->req = std::move(r);
  s->ev = std::move(ev);
  const RequestId id = s->id;
  if (s->req.max_tokens == 0) {
    finish(*s, "length");
    return id;
  }
  waiting_.push_back(std::move(s));
  return id;
}

void Scheduler::emit(Seq& s, bool final) {
  const std::string& text = s.out.text;
  size_t safe = final ? text.size() : (text.size() > s.holdback ? text.size() - s.holdback : 0);
  // Never inside a UTF-8 character: a piece ends before a continuation byte.
  while (safe > s.emitted && safe < text.size() && (static_cast<unsigned char>(text[safe]) & 0xC0) == 0x80) --safe;
  if (safe > s.emitted) {
    if (s.ev.on_text) s.ev.on_text(text.substr(s.emitted, safe - s.emitted));
    s.emitted = safe;
  }
}

void Scheduler::finish(Seq& s, const char* why) {
  s.done = true;
  if (s.dec) s.out.text += s.dec->flush();
  s.out.finish_reason = why;
  emit(s, true);
  if (s.cache) {
    kv_reserved_ -= s.cache->bytes();
    s.cache.reset();
  }
  if (s.ev.on_finish) s.ev.on_finish(s.out);
}

bool Scheduler::cancel(RequestId id) {
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
    if ((*it)->id == id) {
      std::unique_ptr<Seq> s = std::move(*it);
      waiting_.erase(it);
      finish(*s, "cancelled");
      return true;
    }
  for (auto& s : running_)
    if (s->id == id && !s->done && !s->cancelled) {
      s->cancelled = true;  // settled at the next step boundary (callbacks may be on the stack)
      return true;
    }
  return false;
}

bool Scheduler::step() {
  // Cancelled running requests go first: their KV memory admits others this step.
  for (auto& s : running_)
    if (s->cancelled && !s->done) finish(*s, "cancelled");
  running_.erase(std::remove_if(running_.begin(), running_.end(), [](auto& s) { return s->done; }), running_.end());
  if (idle()) return false;

  items_.clear();
  owners_.clear();
  int64_t budget = o_.max_batch_tokens;
  for (auto& s : running_) {
    if (s->prefilled < int64_t(s->req.prompt.size())) continue;
    items_.push_back({s->cache.get(), &s->next, 1, LogitsMode::Last, s->routing.get()});
    owners_.push_back(s.get());
    --budget;
  }
  // Prompts already admitted continue their chunked prefill.
  for (auto& s : running_) {
    const int64_t left = int64_t(s->req.prompt.size()) - s->prefilled;
    if (left <= 0 || budget <= 0) continue;
    const int64_t n = std::min(left, budget);
    items_.push_back({s->cache.get(), s->req.prompt.data() + s->prefilled, n,
                      n == left ? LogitsMode::Last : LogitsMode::None, s->routing.get()});
    owners_.push_back(s.get());
    budget -= n;
  }
  // Admission, in order, while the step's tokens, the running slots and the KV budget allow.
  while (!waiting_.empty() && budget > 0 && int(running_.size()) < o_.max_running) {
    Seq& s = *waiting_.front();
    const int64_t total = int64_t(s.req.prompt.size()) + s.req.max_tokens;
    if (kv_reserved_ + kv_bytes(total) > o_.kv_budget_bytes) break;  // waits for memory, in order
    // Allocated whole before it leaves the queue: an admitted request never runs out of
    // memory, and a failed allocation leaves it waiting (the exception reaches the caller).
    std::unique_ptr<KvCache> cache = m_.new_cache();
    cache->reserve(total);
    std::unique_ptr<Seq> sp = std::move(waiting_.front());
    waiting_.pop_front();
    sp->cache = std::move(cache);
    kv_reserved_ += sp->cache->bytes();
    const int64_t left = int64_t(sp->req.prompt.size());
    // per_request routing needs the whole prompt in one forward (its mean is the router input).
    const bool whole = sp->routing && m_.experts()->needs_whole_prompt();
    const int64_t n = whole ? left : std::min(left, budget);
    items_.push_back({sp->cache.get(), sp->req.prompt.data(), n, n == left ? LogitsMode::Last : LogitsMode::None,
                      sp->routing.get()});
    owners_.push_back(sp.get());
    budget -= n;
    running_.push_back(std::move(sp));
  }
  // Something always runs: with nothing running the queue head fits (submit() checked its
  // KV cache against the whole budget) and the step has its full token budget.
  ATMOE_ASSERT(!items_.empty());
  int64_t tokens = 0;
  for (const auto& it : items_) tokens += it.n;
  last_step_tokens_ = tokens;
  m_.forward(items_, logits_);

  const Tokenizer& tok = m_.tokenizer();
  const int64_t V = m_.config().vocab;
  size_t row = 0;
  for (size_t i = 0; i < items_.size(); ++i) {
    Seq& s = *owners_[i];
    if (items_[i].tokens != &s.next) s.prefilled += items_[i].n;
    if (items_[i].logits == LogitsMode::None) continue;
    const float* lg = logits_.data() + row * size_t(V);
    ++row;
    if (s.cancelled) continue;  // settled at the next step
    const float* sl = lg;  // the row the sampler sees: biased and penalised when asked
    if (!s.req.logit_bias.empty() || s.req.penalties.active()) {
      row_.assign(lg, lg + V);
      for (const auto& [t, b] : s.req.logit_bias) row_[size_t(t)] += b;
      if (s.req.penalties.active())
        cpu::apply_penalties(row_.data(), V, s.req.penalties, s.counts.data(),
                             s.in_prompt.empty() ? nullptr : s.in_prompt.data());
      sl = row_.data();
    }
    const int32_t tk = cpu::sample(sl, V, s.req.sampling, s.rng, scratch_);
    GenerateResult& r = s.out;
    if (!s.req.ignore_eos && tok.is_eog(tk)) {
      finish(s, "stop");
      continue;
    }
    r.tokens.push_back(tk);
    if (!s.counts.empty()) ++s.counts[size_t(tk)];
    const cpu::TokenLogprob* lp = nullptr;
    if (s.req.logprobs >= 0) {
      r.logprobs.emplace_back();
      cpu::logprobs(lg, V, tk, s.req.logprobs, r.logprobs.back(), scratch_);
      lp = &r.logprobs.back();
    }
    if (s.ev.on_token) s.ev.on_token(tk, lp);
    const size_t before = r.text.size();
    r.text += s.dec->push(tk);
    // Stop strings: search only where a new match can start; the earliest match in the
    // text wins (a token may complete two).
    size_t cut = std::string::npos;
    for (const auto& st : s.req.stop) {
      if (st.empty()) continue;
      const size_t from = before >= st.size() ? before - st.size() + 1 : 0;
      cut = std::min(cut, r.text.find(st, from));
    }
    const bool stopped = cut != std::string::npos;
    if (stopped) {
      r.text.resize(cut);
      s.emitted = std::min(s.emitted, cut);
    }
    if (stopped) {
      s.dec.reset();  // the rest of the decoder's bytes lie past the stop string
      finish(s, "stop");
      continue;
    }
    if (int(r.tokens.size()) >= s.req.max_tokens) {
      finish(s, "length");
      continue;
    }
    s.next = tk;
    emit(s, false);
  }
  running_.erase(std::remove_if(running_.begin(), running_.end(), [](auto& s) { return s->done; }), running_.end());
  return true;
}

}  // namespace atmoe
