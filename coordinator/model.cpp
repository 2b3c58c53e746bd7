#include "coordinator/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/error.h"
#include "coordinator/expert_dispatch.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/silu_mul.h"
#include "kernels/thread_pool.h"

namespace atmoe {

// Activation buffers for one forward call, grown on demand and reused.
struct Model::Scratch {
  std::vector<float> x, h, qkv, attn, gu, act, ws, attn_ws, sel;
  std::vector<int32_t> pos;
  std::vector<cpu::AttentionSeq> seqs;
};

Model::Model() : s_(std::make_unique<Scratch>()) {}
Model::~Model() = default;

int64_t Model::weight_bytes() const {
  int64_t b = int64_t(lm_head_.w.nbytes());
  for (const auto& L : layers_) b += int64_t(L.qkv.w.nbytes() + L.o.w.nbytes() + L.gate_up.w.nbytes() + L.down.w.nbytes());
  return b;
}

std::unique_ptr<KvCache> Model::new_cache() const {
  return std::make_unique<KvCache>(cfg_.n_layers, int64_t(cfg_.n_kv_heads) * cfg_.head_dim, cfg_.max_position);
}

template <class V>
static void grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

static void linear(const Linear& L, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t T,
                   std::vector<float>& ws, ThreadPool& pool, bool accumulate = false) {
  cpu::MatmulParams p;
  p.x = x;
  p.ldx = ldx;
  p.w = L.w.raw();
  p.w_dtype = L.w.dtype();
  p.bias = L.bias.defined() && L.bias.numel() ? L.bias.data<float>() : nullptr;
  p.y = y;
  p.ldy = ldy;
  p.T = T;
  p.N = L.N;
  p.K = L.K;
  p.accumulate = accumulate;
  grow(ws, size_t(cpu::matmul_workspace_floats(p)));
  cpu::matmul(p, ws.data(), pool);
}

void Model::forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) {
  const auto& c = cfg_;
  ThreadPool& pool = *pool_;
  Scratch& s = *s_;
  const int64_t d = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  const int64_t qd = Hq * D, kvd = Hkv * D, qkvd = qd + 2 * kvd, F = c.ffn, V = c.vocab;
  ExpertDispatch* const ex = experts_;
  if (ex) ex->begin_step(*this, items);
  int64_t T = 0, max_ctx = 0;
  for (const auto& it : items) {
    ATMOE_ASSERT(it.cache && it.n > 0);
    it.cache->reserve(it.cache->len() + it.n);
    max_ctx = std::max(max_ctx, it.cache->len() + it.n);
    T += it.n;
  }
  logits.clear();
  if (T == 0) return;
  grow(s.x, size_t(T * d));
  grow(s.h, size_t(T * d));
  grow(s.qkv, size_t(T * qkvd));
  grow(s.attn, size_t(T * qd));
  grow(s.gu, size_t(T * 2 * F));
  grow(s.act, size_t(T * F));
  s.pos.resize(size_t(T));
  s.seqs.resize(items.size());

  // Embedding lookup and positions.
  int64_t t = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const auto& it = items[i];
    auto& sq = s.seqs[i];
    sq.t0 = t;
    sq.T = it.n;
    sq.pos = s.pos.data() + t;
    for (int64_t j = 0; j < it.n; ++j, ++t) {
      int32_t tok = it.tokens[j];
      ATMOE_CHECK_INPUT(tok >= 0 && tok < V, "token id {} outside the vocabulary of {}", tok, V);
      s.pos[size_t(t)] = int32_t(it.cache->len() + j);
      float* xr = s.x.data() + t * d;
      if (embed_.dtype() == DType::F32) std::memcpy(xr, embed_.data<float>() + int64_t(tok) * d, size_t(d) * 4);
      else convert_to_f32(DType::BF16, embed_.data<uint16_t>() + int64_t(tok) * d, xr, size_t(d));
    }
  }

  const float scale = 1.f / std::sqrt(float(D));
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = layers_[size_t(l)];
    cpu::rmsnorm({s.x.data(), d, L.attn_norm.data<float>(), s.h.data(), d, T, d, float(c.rms_eps)}, &pool);
    if (ex) {
      ex->route(l, items, s.h.data(), d, T);
      ex->post(l, SiteInput::AttnIn, s.h.data(), d, T);
    }
    linear(L.qkv, s.h.data(), d, s.qkv.data(), qkvd, T, s.ws, pool);
    if (ex) ex->wait(l, SiteInput::AttnIn, s.qkv.data(), qkvd, T);
    // RoPE on q and k (heads contiguous inside each row).
    cpu::RopeParams rq{s.qkv.data(), qkvd, T, Hq, D, s.pos.data(), inv_freq_.data(), c.rope_style == RopeStyle::Neox};
    cpu::rope(rq);
    cpu::RopeParams rk = rq;
    rk.x = s.qkv.data() + qd;
    rk.H = Hkv;
    cpu::rope(rk);
    // Append k, v to each sequence's cache.
    for (size_t i = 0; i < items.size(); ++i) {
      auto& sq = s.seqs[i];
      KvCache* kc = items[i].cache;
      for (int64_t j = 0; j < sq.T; ++j) {
        const float* row = s.qkv.data() + (sq.t0 + j) * qkvd;
        int64_t p = sq.pos[j];
        std::memcpy(kc->k(l) + p * kvd, row + qd, size_t(kvd) * 4);
        std::memcpy(kc->v(l) + p * kvd, row + qd + kvd, size_t(kvd) * 4);
      }
      sq.k = kc->k(l);
      sq.v = kc->v(l);
    }
    cpu::AttentionParams ap;
    ap.q = s.qkv.data();
    ap.ldq = qkvd;
    ap.out = s.attn.data();
    ap.ldo = qd;
    ap.Hq = Hq;
    ap.Hkv = Hkv;
    ap.D = D;
    ap.scale = scale;
    ap.seqs = s.seqs.data();
    ap.n_seqs = int64_t(s.seqs.size());
    ap.max_ctx = max_ctx;
    grow(s.attn_ws, size_t(cpu::attention_workspace_floats(ap, pool.size())));
    cpu::attention(ap, s.attn_ws.data(), pool);
    if (ex) ex->post(l, SiteInput::AttnOut, s.attn.data(), qd, T);
    linear(L.o, s.attn.data(), qd, s.x.data(), d, T, s.ws, pool, /*accumulate=*/true);
    if (ex) ex->wait(l, SiteInput::AttnOut, s.x.data(), d, T);

    cpu::rmsnorm({s.x.data(), d, L.ffn_norm.data<float>(), s.h.data(), d, T, d, float(c.rms_eps)}, &pool);
    if (ex) ex->post(l, SiteInput::MlpIn, s.h.data(), d, T);
    linear(L.gate_up, s.h.data(), d, s.gu.data(), 2 * F, T, s.ws, pool);
    if (ex) ex->wait(l, SiteInput::MlpIn, s.gu.data(), 2 * F, T);
    cpu::silu_mul({s.gu.data(), 2 * F, s.gu.data() + F, 2 * F, s.act.data(), F, T, F}, &pool);
    if (ex) ex->post(l, SiteInput::MlpAct, s.act.data(), F, T);
    linear(L.down, s.act.data(), F, s.x.data(), d, T, s.ws, pool, /*accumulate=*/true);
    if (ex) ex->wait(l, SiteInput::MlpAct, s.x.data(), d, T);
    if (l == stop_after_layer_) {  // pooled_hidden
      pooled_out_->assign(size_t(d), 0.f);
      for (int64_t t2 = 0; t2 < T; ++t2)
        for (int64_t i = 0; i < d; ++i) (*pooled_out_)[size_t(i)] += s.x[size_t(t2 * d + i)] / float(T);
      return;
    }
  }

  if (ex) ex->end_step();
  for (auto& it : items) it.cache->set_len(it.cache->len() + it.n);

  // Final norm and lm_head only on the rows whose logits were asked for.
  int64_t R = 0;
  for (const auto& it : items) R += it.logits == LogitsMode::All ? it.n : it.logits == LogitsMode::Last ? 1 : 0;
  if (R == 0) return;
  grow(s.sel, size_t(R * d));
  int64_t r = 0;
  t = 0;
  for (const auto& it : items) {
    if (it.logits == LogitsMode::All) {
      std::memcpy(s.sel.data() + r * d, s.x.data() + t * d, size_t(it.n * d) * 4);
      r += it.n;
    } else if (it.logits == LogitsMode::Last) {
      std::memcpy(s.sel.data() + r * d, s.x.data() + (t + it.n - 1) * d, size_t(d) * 4);
      r += 1;
    }
    t += it.n;
  }
  cpu::rmsnorm({s.sel.data(), d, out_norm_.data<float>(), s.sel.data(), d, R, d, float(c.rms_eps)}, &pool);
  logits.resize(size_t(R * V));
  linear(lm_head_, s.sel.data(), d, logits.data(), V, R, s.ws, pool);
}

std::vector<float> Model::pooled_hidden(const int32_t* tokens, int64_t n, int layer) {
  ATMOE_ASSERT(layer >= 0 && layer < cfg_.n_layers);
  auto cache = new_cache();
  std::vector<float> out, lg;
  ExpertDispatch* ep = experts_;
  experts_ = nullptr;
  stop_after_layer_ = layer;
  pooled_out_ = &out;
  struct Restore {
    Model* m;
    ExpertDispatch* ep;
    ~Restore() {
      m->experts_ = ep;
      m->stop_after_layer_ = -1;
      m->pooled_out_ = nullptr;
    }
  } restore{this, ep};
  forward({{cache.get(), tokens, n, LogitsMode::None}}, lg);
  return out;
}

}  // namespace atmoe
