#include "coordinator/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/error.h"
#include "coordinator/expert_dispatch.h"
#include "kernels/backend.h"

namespace atmoe {

// Activation buffers for one forward call in backend memory, grown on demand and reused.
struct Model::Scratch {
  Buffer x, h, qkv, attn, gu, act, ws, sel, logits, pos;
  std::vector<float> stage;   // host rows of the embedding lookup (device backends)
  std::vector<float> h_host;  // host copy of the router's input rows (device backends)
  std::vector<int32_t> pos_host;
  std::vector<ops::AttentionSeq> seqs;
};

Model::Model() : s_(std::make_unique<Scratch>()) {}
Model::~Model() = default;

int64_t Model::weight_bytes() const {
  int64_t b = int64_t(lm_head_.w.buf.bytes());
  for (const auto& L : layers_)
    b += int64_t(L.qkv.w.buf.bytes() + L.o.w.buf.bytes() + L.gate_up.w.buf.bytes() + L.down.w.buf.bytes());
  return b;
}

std::unique_ptr<KvCache> Model::new_cache() const {
  return std::make_unique<KvCache>(*be_, cfg_.n_layers, int64_t(cfg_.n_kv_heads) * cfg_.head_dim, cfg_.max_position);
}

static float* grow(Backend& be, Buffer& b, int64_t floats) {
  b.reserve(be, size_t(floats) * 4);
  return b.as<float>();
}

static void linear(Backend& be, const Linear& L, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t T,
                   Buffer& ws, bool accumulate = false) {
  ops::MatmulParams p;
  p.x = x;
  p.ldx = ldx;
  p.w = L.w.get();
  p.w_dtype = L.w.dtype;
  p.bias = L.bias.as<float>();
  p.y = y;
  p.ldy = ldy;
  p.T = T;
  p.N = L.N;
  p.K = L.K;
  p.accumulate = accumulate;
  ws.reserve(be, be.workspace_bytes(p));
  be.matmul(p, ws.get());
}

void Model::forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) {
  const auto& c = cfg_;
  Backend& be = *be_;
  Scratch& s = *s_;
  const int64_t d = c.hidden, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  const int64_t qd = Hq * D, kvd = Hkv * D, qkvd = qd + 2 * kvd, F = c.ffn, V = c.vocab;
  ExpertDispatch* const ex = experts_;
  if (ex) ex->begin_step(*this, items);
  // Computed once per forward: per_request_done flips inside the last layer's route().
  const bool reads_rows = ex && ex->route_reads_rows(items);
  int64_t T = 0, max_ctx = 0;
  for (const auto& it : items) {
    ATMOE_ASSERT(it.cache && it.n > 0);
    it.cache->reserve(it.cache->len() + it.n);
    max_ctx = std::max(max_ctx, it.cache->len() + it.n);
    T += it.n;
  }
  logits.clear();
  if (T == 0) return;
  float* x = grow(be, s.x, T * d);
  float* h = grow(be, s.h, T * d);
  float* qkv = grow(be, s.qkv, T * qkvd);
  float* attn = grow(be, s.attn, T * qd);
  float* gu = grow(be, s.gu, T * 2 * F);
  float* act = grow(be, s.act, T * F);
  s.pos.reserve(be, size_t(T) * 4);
  int32_t* pos = s.pos.as<int32_t>();
  s.pos_host.resize(size_t(T));
  s.seqs.resize(items.size());

  // Embedding lookup (host table) and positions.
  float* xr_base = x;
  if (!be.host_memory()) {
    s.stage.resize(size_t(T * d));
    xr_base = s.stage.data();
  }
  int64_t t = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const auto& it = items[i];
    auto& sq = s.seqs[i];
    sq.t0 = t;
    sq.T = it.n;
    sq.pos = pos + t;
    for (int64_t j = 0; j < it.n; ++j, ++t) {
      int32_t tok = it.tokens[j];
      ATMOE_CHECK_INPUT(tok >= 0 && tok < V, "token id {} outside the vocabulary of {}", tok, V);
      s.pos_host[size_t(t)] = int32_t(it.cache->len() + j);
      float* xr = xr_base + t * d;
      if (embed_.dtype() == DType::F32)
        std::memcpy(xr, embed_.data<float>() + int64_t(tok) * d, size_t(d) * 4);
      else
        convert_to_f32(DType::BF16, embed_.data<uint16_t>() + int64_t(tok) * d, xr, size_t(d));
    }
  }
  if (xr_base != x) be.upload(x, xr_base, size_t(T * d) * 4);
  be.upload(pos, s.pos_host.data(), size_t(T) * 4);

  const float scale = 1.f / std::sqrt(float(D));
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = layers_[size_t(l)];
    be.rmsnorm({x, d, L.attn_norm.as<float>(), h, d, T, d, float(c.rms_eps)});
    if (ex) {
      // The router runs on the host: on a device backend it reads a host copy of the
      // normalised rows (T x hidden floats a layer), downloaded only when this forward's
      // routing reads them (else nullptr: nothing may); post/wait take backend memory.
      const float* hh = h;
      if (!be.host_memory()) {
        if (reads_rows) {
          s.h_host.resize(size_t(T * d));
          be.download(s.h_host.data(), h, size_t(T * d) * 4);
        }
        hh = reads_rows ? s.h_host.data() : nullptr;
      }
      ex->route(l, items, hh, d, T);
      ex->post(l, SiteInput::AttnIn, h, d, T);
    }
    linear(be, L.qkv, h, d, qkv, qkvd, T, s.ws);
    if (ex) ex->wait(l, SiteInput::AttnIn, qkv, qkvd, T);
    // RoPE on q and k (heads contiguous inside each row).
    ops::RopeParams rq{qkv, qkvd, T, Hq, D, pos, inv_freq_dev_.as<float>(), c.rope_style == RopeStyle::Neox};
    be.rope(rq);
    ops::RopeParams rk = rq;
    rk.x = qkv + qd;
    rk.H = Hkv;
    be.rope(rk);
    // Append k, v to each sequence's cache (a sequence's new rows are at consecutive
    // positions: one strided run per sequence).
    for (size_t i = 0; i < items.size(); ++i) {
      auto& sq = s.seqs[i];
      KvCache* kc = items[i].cache;
      const int64_t p0 = s.pos_host[size_t(sq.t0)];
      const float* rows = qkv + sq.t0 * qkvd;
      be.copy_2d(kc->k(l) + p0 * kvd, size_t(kvd) * 4, rows + qd, size_t(qkvd) * 4, size_t(kvd) * 4, size_t(sq.T));
      be.copy_2d(kc->v(l) + p0 * kvd, size_t(kvd) * 4, rows + qd + kvd, size_t(qkvd) * 4, size_t(kvd) * 4,
                 size_t(sq.T));
      sq.k = kc->k(l);
      sq.v = kc->v(l);
    }
    ops::AttentionParams ap;
    ap.q = qkv;
    ap.ldq = qkvd;
    ap.out = attn;
    ap.ldo = qd;
    ap.Hq = Hq;
    ap.Hkv = Hkv;
    ap.D = D;
    ap.scale = scale;
    ap.seqs = s.seqs.data();
    ap.n_seqs = int64_t(s.seqs.size());
    ap.max_ctx = max_ctx;
    s.ws.reserve(be, be.workspace_bytes(ap));
    be.attention(ap, s.ws.get());
    if (ex) ex->post(l, SiteInput::AttnOut, attn, qd, T);
    linear(be, L.o, attn, qd, x, d, T, s.ws, /*accumulate=*/true);
    if (ex) ex->wait(l, SiteInput::AttnOut, x, d, T);

    be.rmsnorm({x, d, L.ffn_norm.as<float>(), h, d, T, d, float(c.rms_eps)});
    if (ex) ex->post(l, SiteInput::MlpIn, h, d, T);
    linear(be, L.gate_up, h, d, gu, 2 * F, T, s.ws);
    if (ex) ex->wait(l, SiteInput::MlpIn, gu, 2 * F, T);
    be.silu_mul({gu, 2 * F, gu + F, 2 * F, act, F, T, F});
    if (ex) ex->post(l, SiteInput::MlpAct, act, F, T);
    linear(be, L.down, act, F, x, d, T, s.ws, /*accumulate=*/true);
    if (ex) ex->wait(l, SiteInput::MlpAct, x, d, T);
    if (l == stop_after_layer_) {  // pooled_hidden
      s.stage.resize(size_t(T * d));
      be.download(s.stage.data(), x, size_t(T * d) * 4);
      pooled_out_->assign(size_t(d), 0.f);
      for (int64_t t2 = 0; t2 < T; ++t2)
        for (int64_t i = 0; i < d; ++i) (*pooled_out_)[size_t(i)] += s.stage[size_t(t2 * d + i)] / float(T);
      return;
    }
  }

  if (ex) ex->end_step();
  for (auto& it : items) it.cache->set_len(it.cache->len() + it.n);

  // Final norm and lm_head only on the rows whose logits were asked for.
  int64_t R = 0;
  for (const auto& it : items) R += it.logits == LogitsMode::All ? it.n : it.logits == LogitsMode::Last ? 1 : 0;
  if (R == 0) return;
  float* sel = grow(be, s.sel, R * d);
  int64_t r = 0;
  t = 0;
  for (const auto& it : items) {
    if (it.logits == LogitsMode::All) {
      be.copy(sel + r * d, x + t * d, size_t(it.n * d) * 4);
      r += it.n;
    } else if (it.logits == LogitsMode::Last) {
      be.copy(sel + r * d, x + (t + it.n - 1) * d, size_t(d) * 4);
      r += 1;
    }
    t += it.n;
  }
  be.rmsnorm({sel, d, out_norm_.as<float>(), sel, d, R, d, float(c.rms_eps)});
  logits.resize(size_t(R * V));
  if (be.host_memory()) {  // straight into the caller's rows
    linear(be, lm_head_, sel, d, logits.data(), V, R, s.ws);
  } else {
    float* lg = grow(be, s.logits, R * V);
    linear(be, lm_head_, sel, d, lg, V, R, s.ws);
    be.download(logits.data(), lg, size_t(R * V) * 4);
  }
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
