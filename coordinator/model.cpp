#include "coordinator/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/error.h"
#include "coordinator/experts.h"
#include "coordinator/trex_pool.h"
#include "kernels/cpu/trex.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/lora.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/silu_mul.h"
#include "kernels/thread_pool.h"

namespace atmoe {

// Activation buffers for one forward call, grown on demand and reused.
struct Model::Scratch {
  std::vector<float> x, h, qkv, attn, gu, act, ws, attn_ws, sel;
  // Experts: per-token coefficients [T, E + 1]: λ·w[e] for the experts, (1-λ) in column E
  // for the general expert; the shrink buffer of the LoRA kernel ([T, R]); the blocks.
  std::vector<float> coef, lora_u, umean;
  std::vector<double> ra, rw;
  std::vector<cpu::LoraBlock> blocks;
  std::vector<std::pair<size_t, int64_t>> lora_items;
  bool routing_active = false;
  std::vector<int32_t> pos;
  std::vector<cpu::AttentionSeq> seqs;
  // T-REX: rows that route, their sequences, and per-row intuition and ω'.
  std::vector<int32_t> trex_rows;
  std::vector<SeqRouting*> trex_seq;
  std::vector<float> trex_s, trex_omega, trex_ws, trex_tmp;
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
  // T-REX intuitions that come from a base layer's pooled hidden state, before this
  // forward uses the scratch buffers.
  if (trex_)
    for (const auto& it : items)
      if (it.routing && !it.routing->ctl.off && !it.routing->trex_ready) {
        ATMOE_ASSERT(it.cache->len() == 0);  // the whole prompt is in this forward
        auto e = pooled_hidden(it.tokens, it.n, trex_->bundle().trex->hidden_layer);
        it.routing->trex_ce = trex_->cluster_scores(e.data(), int64_t(e.size()));
        it.routing->trex_ready = true;
      }
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
    linear(L.qkv, s.h.data(), d, s.qkv.data(), qkvd, T, s.ws, pool);
    if (experts_ || trex_) {
      route_layer(l, items);
      apply_site(l, int(Site::Q), s.h.data(), d, s.qkv.data(), qkvd, T);
      apply_site(l, int(Site::K), s.h.data(), d, s.qkv.data() + qd, qkvd, T);
      apply_site(l, int(Site::V), s.h.data(), d, s.qkv.data() + qd + kvd, qkvd, T);
    }
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
    linear(L.o, s.attn.data(), qd, s.x.data(), d, T, s.ws, pool, /*accumulate=*/true);
    if (experts_ || trex_) apply_site(l, int(Site::O), s.attn.data(), qd, s.x.data(), d, T);

    cpu::rmsnorm({s.x.data(), d, L.ffn_norm.data<float>(), s.h.data(), d, T, d, float(c.rms_eps)}, &pool);
    linear(L.gate_up, s.h.data(), d, s.gu.data(), 2 * F, T, s.ws, pool);
    if (experts_ || trex_) {
      apply_site(l, int(Site::Gate), s.h.data(), d, s.gu.data(), 2 * F, T);
      apply_site(l, int(Site::Up), s.h.data(), d, s.gu.data() + F, 2 * F, T);
    }
    cpu::silu_mul({s.gu.data(), 2 * F, s.gu.data() + F, 2 * F, s.act.data(), F, T, F}, &pool);
    linear(L.down, s.act.data(), F, s.x.data(), d, T, s.ws, pool, /*accumulate=*/true);
    if (experts_ || trex_) apply_site(l, int(Site::Down), s.act.data(), F, s.x.data(), d, T);
    if (l == stop_after_layer_) {  // pooled_hidden
      pooled_out_->assign(size_t(d), 0.f);
      for (int64_t t2 = 0; t2 < T; ++t2)
        for (int64_t i = 0; i < d; ++i) (*pooled_out_)[size_t(i)] += s.x[size_t(t2 * d + i)] / float(T);
      return;
    }
  }

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

// Routing weights of every token row for layer `layer`, from the router input h (the
// normalised attention input). per_request: the mean of h over the prompt, computed once
// (the first forward of a sequence holds its whole prompt) and reused while decoding.
void Model::route_layer(int layer, const std::vector<ForwardItem>& items) {
  Scratch& s = *s_;
  if (trex_) {  // T-REX routes inside each module (kernels/cpu/trex.h); collect the rows that use it
    (void)layer;
    s.trex_rows.clear();
    s.trex_seq.clear();
    int64_t t0 = 0;
    for (const auto& it : items) {
      if (it.routing && !it.routing->ctl.off)
        for (int64_t j = 0; j < it.n; ++j) {
          s.trex_rows.push_back(int32_t(t0 + j));
          s.trex_seq.push_back(it.routing);
        }
      t0 += it.n;
    }
    s.routing_active = !s.trex_rows.empty();
    return;
  }
  const ExpertPool& ep = *experts_;
  const int E = ep.n_experts(), G = int(ep.bundle().groups.size());
  const int64_t d = cfg_.hidden;
  const bool per_token = ep.bundle().router_input == RouterInput::PerToken;
  const bool has_general = ep.general() != nullptr;
  int64_t T = 0;
  for (const auto& it : items) T += it.n;
  const int64_t C = E + 1;
  s.coef.assign(size_t(T * C), 0.f);
  s.ra.resize(size_t(G));
  s.rw.resize(size_t(E));
  s.umean.resize(size_t(d));
  s.routing_active = false;
  int64_t t0 = 0;
  for (const auto& it : items) {
    SeqRouting* r = it.routing;
    if (r && !r->ctl.off) {
      s.routing_active = true;
      const float lam = float(r->ctl.lambda);
      if (r->a.empty()) {
        r->a.assign(size_t(cfg_.n_layers), std::vector<double>(size_t(G), 0.0));
        r->w.assign(size_t(cfg_.n_layers), std::vector<double>(size_t(E), 0.0));
      }
      if (!per_token) {
        if (!r->per_request_done) {
          ATMOE_ASSERT(it.cache->len() == 0);  // the whole prompt is in this forward
          std::fill(s.umean.begin(), s.umean.end(), 0.f);
          for (int64_t j = 0; j < it.n; ++j)
            for (int64_t i = 0; i < d; ++i) s.umean[size_t(i)] += s.h[size_t((t0 + j) * d + i)];
          for (auto& v : s.umean) v /= float(it.n);
          ep.router().route(layer, s.umean.data(), r->ctl, r->a[size_t(layer)].data(), r->w[size_t(layer)].data());
          if (layer == cfg_.n_layers - 1) r->per_request_done = true;
        }
        for (int64_t j = 0; j < it.n; ++j) {
          for (int e = 0; e < E; ++e) s.coef[size_t((t0 + j) * C + e)] = lam * float(r->w[size_t(layer)][size_t(e)]);
          s.coef[size_t((t0 + j) * C + E)] = has_general && r->ctl.adapter < 0 ? 1.f - lam : 0.f;
        }
      } else {
        for (int64_t j = 0; j < it.n; ++j) {
          ep.router().route(layer, s.h.data() + (t0 + j) * d, r->ctl, s.ra.data(), s.rw.data());
          for (int e = 0; e < E; ++e) s.coef[size_t((t0 + j) * C + e)] = lam * float(s.rw[size_t(e)]);
          s.coef[size_t((t0 + j) * C + E)] = has_general && r->ctl.adapter < 0 ? 1.f - lam : 0.f;
          // Running mean over tokens for the request-level trace; per-token detail if asked.
          const double k = double(r->n_token_steps + j);
          for (int g = 0; g < G; ++g) r->a[size_t(layer)][size_t(g)] += (s.ra[size_t(g)] - r->a[size_t(layer)][size_t(g)]) / (k + 1);
          for (int e = 0; e < E; ++e) r->w[size_t(layer)][size_t(e)] += (s.rw[size_t(e)] - r->w[size_t(layer)][size_t(e)]) / (k + 1);
          if (r->trace_tokens) {
            size_t tok = size_t(r->n_token_steps + j);
            if (r->tokens.size() <= tok) {
              r->tokens.resize(tok + 1, std::vector<std::vector<double>>(size_t(cfg_.n_layers)));
              r->tokens_groups.resize(tok + 1, std::vector<std::vector<double>>(size_t(cfg_.n_layers)));
            }
            r->tokens[tok][size_t(layer)] = s.rw;
            r->tokens_groups[tok][size_t(layer)] = s.ra;
          }
        }
        if (layer == cfg_.n_layers - 1) r->n_token_steps += it.n;
      }
    }
    t0 += it.n;
  }
}

// y += Δ of one site for every token row: shrink -> mix -> expand over the active groups.
void Model::apply_site(int layer, int site, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t T) {
  Scratch& s = *s_;
  if (!s.routing_active) return;
  if (trex_) {
    const TrexSite* ts = trex_->site(layer, Site(site));
    if (!ts) return;
    const auto& ad = trex_->adapter();
    const int64_t n = int64_t(s.trex_rows.size()), E = ad.E;
    s.trex_s.resize(size_t(n * E));
    s.trex_omega.resize(size_t(n));
    s.trex_tmp.resize(size_t(E));
    const SeqRouting* last = nullptr;
    for (int64_t j = 0; j < n; ++j) {
      const SeqRouting* r = s.trex_seq[size_t(j)];
      if (r != last) trex_->module_intuition(*ts, r->trex_ce, s.trex_tmp.data());
      last = r;
      std::copy(s.trex_tmp.begin(), s.trex_tmp.end(), s.trex_s.begin() + j * E);
      s.trex_omega[size_t(j)] = r->trex_ctl.omega ? float(*r->trex_ctl.omega) : ts->omega;
    }
    cpu::TrexParams p;
    p.x = x;
    p.ldx = ldx;
    p.AW = ts->AW.raw();
    p.B = ts->B.raw();
    p.dtype = ts->AW.dtype();
    p.R = ts->R;
    p.T = n;
    p.d_in = ts->d_in;
    p.d_out = ts->d_out;
    p.r1 = ad.r1;
    p.r2 = ad.r2;
    p.E = E;
    p.diagonal = ad.mode == "rank1";
    p.rows = s.trex_rows.data();
    p.s = s.trex_s.data();
    p.omega = s.trex_omega.data();
    p.gate = ts->gate;
    grow(s.trex_ws, size_t(cpu::trex_workspace_floats(p)));
    p.ws = s.trex_ws.data();
    p.y = y;
    p.ldy = ldy;
    cpu::trex_apply(p, *pool_);
    (void)T;
    return;
  }
  const SiteStack& st = experts_->stack(layer, Site(site));
  if (st.R == 0) return;
  const int64_t C = experts_->n_experts() + 1;
  // Each block (expert group, then the general expert) with the tokens that weight it.
  if (s.blocks.size() < st.block.size()) s.blocks.resize(st.block.size());
  for (size_t b = 0; b < st.block.size(); ++b) {
    cpu::LoraBlock& blk = s.blocks[b];
    blk.r0 = st.block[b].first;
    blk.r1 = st.block[b].second;
    blk.toks.clear();
    if (blk.r0 == blk.r1) continue;
    for (int64_t t = 0; t < T; ++t) {
      const float* ct = s.coef.data() + t * C;
      for (int32_t e : st.block_experts[b])
        if (ct[e] != 0.f) {
          blk.toks.push_back(int32_t(t));
          break;
        }
    }
  }
  grow(s.lora_u, size_t(T * st.R));
  cpu::LoraMixParams p;
  p.x = x;
  p.ldx = ldx;
  p.A = st.A.raw();
  p.B = st.B.raw();
  p.dtype = st.A.dtype();
  p.row_expert = st.row_expert.data();
  p.row_scale = st.row_scale.data();
  p.coef = s.coef.data();
  p.ldc = C;
  p.u = s.lora_u.data();
  p.y = y;
  p.ldy = ldy;
  p.T = T;
  p.d_in = st.d_in;
  p.d_out = st.d_out;
  p.R = st.R;
  p.blocks = s.blocks.data();
  p.n_blocks = int64_t(st.block.size());
  p.items = &s.lora_items;
  cpu::lora_mix_apply(p, *pool_);
}

std::vector<float> Model::pooled_hidden(const int32_t* tokens, int64_t n, int layer) {
  ATMOE_ASSERT(layer >= 0 && layer < cfg_.n_layers);
  auto cache = new_cache();
  std::vector<float> out, lg;
  const ExpertPool* ep = experts_;
  const TrexPool* tp = trex_;
  experts_ = nullptr;
  trex_ = nullptr;
  stop_after_layer_ = layer;
  pooled_out_ = &out;
  struct Restore {
    Model* m;
    const ExpertPool* ep;
    const TrexPool* tp;
    ~Restore() {
      m->experts_ = ep;
      m->trex_ = tp;
      m->stop_after_layer_ = -1;
      m->pooled_out_ = nullptr;
    }
  } restore{this, ep, tp};
  forward({{cache.get(), tokens, n, LogitsMode::None}}, lg);
  return out;
}

}  // namespace atmoe
