#include "coordinator/trex_pool.h"

#include <cmath>
#include <cstring>
#include <filesystem>

#include <fmt/ranges.h>

#include "common/error.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "common/tensor_check.h"
#include "coordinator/experts.h"
#include "coordinator/model.h"
#include "kernels/backend.h"

namespace atmoe {
namespace fs = std::filesystem;

Tensor load_centroids(const std::string& path) {
  if (path.size() >= 4 && path.substr(path.size() - 4) == ".npy") {
    const std::string all = read_file(path, "centroids", size_t(1) << 32);
    ATMOE_CHECK_INPUT(all.size() >= 10 && all.compare(0, 6, "\x93NUMPY") == 0, "{}: not a .npy file", path);
    const uint8_t major = uint8_t(all[6]);
    const size_t hl = major == 1 ? size_t(uint8_t(all[8])) | size_t(uint8_t(all[9])) << 8
                                 : (all.size() >= 12 ? size_t(uint8_t(all[8])) | size_t(uint8_t(all[9])) << 8 |
                                                           size_t(uint8_t(all[10])) << 16 | size_t(uint8_t(all[11])) << 24
                                                     : 0);
    const size_t off = major == 1 ? 10 : 12;
    ATMOE_CHECK_INPUT(off + hl <= all.size(), "{}: truncated .npy header", path);
    std::string h = all.substr(off, hl);
    bool f8 = h.find("'<f8'") != std::string::npos, f4 = h.find("'<f4'") != std::string::npos;
    ATMOE_CHECK_INPUT(f8 || f4, "{}: centroids must be little-endian float32 or float64", path);
    ATMOE_CHECK_INPUT(h.find("'fortran_order': False") != std::string::npos, "{}: centroids must be C-ordered", path);
    size_t a = h.find("'shape': ("), b = h.find(')', a);
    ATMOE_CHECK_INPUT(a != std::string::npos && b != std::string::npos, "{}: no shape in the .npy header", path);
    int64_t K = 0, D = 0;
    ATMOE_CHECK_INPUT(std::sscanf(h.c_str() + a + 10, "%ld, %ld", &K, &D) == 2 && K > 0 && D > 0 && K < (1 << 20) && D < (1 << 20),
                      "{}: centroids must be a 2-D array [K, d_e]", path);
    const size_t es = f8 ? 8 : 4;
    ATMOE_CHECK_INPUT(all.size() - off - hl == size_t(K * D) * es, "{}: {} bytes of data, [{}, {}] needs {}", path,
                      all.size() - off - hl, K, D, size_t(K * D) * es);
    Tensor t = Tensor::empty(DType::F32, {K, D});
    const char* p = all.data() + off + hl;
    for (int64_t i = 0; i < K * D; ++i) {
      if (f8) {
        double v;
        std::memcpy(&v, p + i * 8, 8);
        ATMOE_CHECK_INPUT(std::isfinite(v) && std::fabs(v) <= 3.4e38, "{}: centroid value {} at index {} is not finite in f32", path, v, i);
        t.data<float>()[i] = float(v);
      } else {
        std::memcpy(t.data<float>() + i, p + i * 4, 4);
      }
    }
    check_finite(t, path, "centroids");
    return t;
  }
  SafetensorsFile st(path);
  ATMOE_CHECK_INPUT(st.has("centroids"), "{}: missing tensor 'centroids' [K, d_e]", path);
  Tensor t = st.get("centroids");
  ATMOE_CHECK_INPUT(t.ndim() == 2 && (t.dtype() == DType::F32 || t.dtype() == DType::F16 || t.dtype() == DType::BF16),
                    "{}: 'centroids' must be a float matrix [K, d_e], got {} {}", path, dtype_name(t.dtype()), t.shape_str());
  ATMOE_CHECK_INPUT(t.dim(0) > 0 && t.dim(1) > 0, "{}: 'centroids' is empty ({})", path, t.shape_str());
  for (const auto& k : st.names())
    ATMOE_CHECK_INPUT(k == "centroids", "{}: unexpected tensor '{}' (expected only 'centroids' [K, d_e])", path, k);
  check_finite(t, path, "centroids");
  return t.to(DType::F32);
}

TrexPool::TrexPool(const Bundle& b, const ModelConfig& c, DType dtype, Backend* be)
    : b_(b), own_be_(be ? nullptr : make_backend("cpu")), be_(be ? be : own_be_.get()) {
  ATMOE_ASSERT(b.trex.has_value());
  const SiteShapes shapes = site_shapes(c);
  shapes_ = shapes;
  ad_ = load_trex_adapter(b.trex->adapter_dir, shapes);
  C_ = load_centroids(b.trex->centroids_file);
  const int64_t K = C_.dim(0);
  const std::string& cf = b.trex->centroids_file;
  if (b.trex->intuition_from_hidden) {
    ATMOE_CHECK_INPUT(C_.dim(1) == c.hidden, "{}: centroids of dimension {} but intuition.source hidden_state gives {}", cf,
                      C_.dim(1), c.hidden);
    ATMOE_CHECK_INPUT(b.trex->hidden_layer < c.n_layers, "{}: t_rex.intuition.layer {} but the base has {} layers", b.manifest,
                      b.trex->hidden_layer, c.n_layers);
  }
  // The released code's shapes: s must end up with E entries.
  if (ad_.mapper) {
    for (auto& [k, m] : ad_.modules)
      ATMOE_CHECK_INPUT(m.M.dim(1) == K, "{}: rank1_flex_mapper has {} inputs but there are {} centroids", ad_.dir, m.M.dim(1), K);
  } else if (ad_.mode == "rank1" || ad_.E == ad_.r1 * ad_.r2) {
    const bool repeat = ad_.mode == "rank1_flex" && ad_.r1 == ad_.r2 && ad_.E == ad_.r1 * ad_.r1 && K == ad_.r1;
    ATMOE_CHECK_INPUT(K == ad_.E || repeat, "{}: {} centroids but the experts need an intuition of {} entries", cf, K, ad_.E);
  }
  sites_.resize(size_t(c.n_layers) * kNumSites);
  for (auto& [ls, m] : ad_.modules) {
    auto st = std::make_unique<TrexSite>();
    const int si = int(ls.second);
    st->d_in = shapes.d_in[size_t(si)];
    st->d_out = shapes.d_out[size_t(si)];
    st->R = ad_.r1 + ad_.E;
    std::vector<float> aw(static_cast<size_t>(st->R * st->d_in), 0.f), bm(static_cast<size_t>(st->d_out * ad_.r2));
    std::memcpy(aw.data(), m.A.data<float>(), m.A.nbytes());
    std::memcpy(aw.data() + ad_.r1 * st->d_in, m.Wr.data<float>(), m.Wr.nbytes());
    // HF-trained lora_B on a GGUF llama base: q/k rows follow the base's rope permutation.
    const bool permute = c.rope_style == RopeStyle::Interleaved && (si == int(Site::Q) || si == int(Site::K));
    for (int64_t n = 0; n < st->d_out; ++n) {
      const int64_t o = permute ? gguf_qk_row(n, c.head_dim) : n;
      std::memcpy(&bm[size_t(o * ad_.r2)], m.B.data<float>() + n * ad_.r2, size_t(ad_.r2) * 4);
    }
    st->AW = prepare_weight(*be_, aw.data(), st->R, st->d_in, dtype);
    st->B = prepare_weight(*be_, bm.data(), st->d_out, ad_.r2, dtype);
    st->omega = float(1.0 / (1.0 + std::exp(-100.0 * m.omega)));
    st->gate = float(1.0 / (1.0 + std::exp(-100.0 * m.gamma)));
    st->M = m.M;
    sites_[size_t(ls.first) * kNumSites + size_t(si)] = std::move(st);
  }
}

const TrexSite* TrexPool::site(int layer, Site s) const { return sites_[size_t(layer) * kNumSites + size_t(s)].get(); }

std::vector<float> TrexPool::cluster_scores(const float* e, int64_t n) const {
  ATMOE_CHECK_INPUT(n == d_e(), "intuition embedding has {} values, the centroids have dimension {}", n, d_e());
  double nrm = 0;
  for (int64_t i = 0; i < n; ++i) nrm += double(e[i]) * e[i];
  ATMOE_CHECK_INPUT(std::isfinite(nrm) && nrm > 0, "intuition embedding must be finite and nonzero");
  const double inv = 1.0 / std::sqrt(nrm);
  std::vector<float> ce(static_cast<size_t>(K()));
  for (int k = 0; k < K(); ++k) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += double(C_.data<float>()[k * n + i]) * e[i] * inv;
    ce[size_t(k)] = float(s);
  }
  return ce;
}

std::vector<float> TrexPool::cluster_scores_pinned(int k) const {
  ATMOE_CHECK_INPUT(k >= 0 && k < K(), "pin_cluster {} out of range 0..{}", k, K() - 1);
  return cluster_scores(C_.data<float>() + int64_t(k) * d_e(), d_e());
}

void TrexPool::module_intuition(const TrexSite& s, const std::vector<float>& ce, float* out) const {
  const int64_t E = ad_.E, K = int64_t(ce.size());
  if (s.M.raw()) {
    for (int64_t e = 0; e < E; ++e) {
      double a = 0;
      for (int64_t k = 0; k < K; ++k) a += double(s.M.data<float>()[e * K + k]) * ce[size_t(k)];
      out[e] = float(a);
    }
  } else {
    for (int64_t e = 0; e < E; ++e) out[e] = ce[size_t(e % K)];
  }
}

std::unique_ptr<SeqRouting> TrexPool::new_routing(const RoutingControls& c) const {
  const auto at = c.atmoe_set(), tx = c.trex_set();
  ATMOE_CHECK_INPUT(at.empty(), "routing: {} applies to at-moe bundles; {} is a t-rex bundle", fmt::join(at, ", "), b_.dir);
  ATMOE_CHECK_INPUT(!c.off || tx.empty(), "routing: off runs the base model only; it cannot be combined with {}", fmt::join(tx, ", "));
  ATMOE_CHECK_INPUT(int(!c.intuition_embedding.empty()) + int(c.intuition_off) + int(c.pin_cluster >= 0) <= 1,
                    "routing: intuition_embedding, intuition off and pin_cluster each set the intuition; give one");
  ATMOE_CHECK_INPUT(c.intuition_embedding.empty() || !b_.trex->intuition_from_hidden,
                    "routing: intuition_embedding: the intuition of {} is the pooled hidden state of layer {}, not a request embedding",
                    b_.dir, b_.trex->hidden_layer);
  ATMOE_CHECK_INPUT(!c.omega || (*c.omega >= 0 && *c.omega <= 1), "routing: omega {} must be in [0, 1]", c.omega.value_or(0));
  ATMOE_CHECK_INPUT(c.pin_cluster < K(), "routing: pin_cluster {} out of range 0..{}", c.pin_cluster, K() - 1);
  auto r = std::make_unique<SeqRouting>();
  r->ctl.off = c.off;
  r->trex_ctl = c;
  if (c.off) return r;
  if (c.intuition_off) {
    r->trex_ce.assign(size_t(K()), 0.f);
    r->trex_ready = true;
  } else if (c.pin_cluster >= 0) {
    r->trex_ce = cluster_scores_pinned(c.pin_cluster);
    r->trex_ready = true;
  } else if (!b_.trex->intuition_from_hidden) {
    ATMOE_CHECK_INPUT(
        !c.intuition_embedding.empty(),
        "routing: this bundle's intuition comes from a request embedding of {} values: give one "
        "(--intuition-embedding FILE; over HTTP the request's \"intuition_embedding\" array), or switch the "
        "intuition off",
        d_e());
    r->trex_ce = cluster_scores(c.intuition_embedding.data(), int64_t(c.intuition_embedding.size()));
    r->trex_ready = true;
  }
  return r;  // hidden_state intuition: computed by the model at prefill
}

void TrexPool::begin_step(Model& m, const std::vector<ForwardItem>& items) {
  // Intuitions that come from a base layer's pooled hidden state, before the forward uses
  // the model's scratch buffers.
  for (const auto& it : items)
    if (it.routing && !it.routing->ctl.off && !it.routing->trex_ready) {
      ATMOE_ASSERT(it.cache->len() == 0);  // the whole prompt is in this forward
      auto e = m.pooled_hidden(it.tokens, it.n, b_.trex->hidden_layer);
      it.routing->trex_ce = cluster_scores(e.data(), int64_t(e.size()));
      it.routing->trex_ready = true;
    }
}

void TrexPool::route(int layer, const std::vector<ForwardItem>& items, const float* h, int64_t ldh, int64_t T) {
  (void)layer;
  (void)h;
  (void)ldh;
  (void)T;
  rows_.clear();
  seq_.clear();
  int64_t t0 = 0;
  for (const auto& it : items) {
    if (it.routing && !it.routing->ctl.off)
      for (int64_t j = 0; j < it.n; ++j) {
        rows_.push_back(int32_t(t0 + j));
        seq_.push_back(it.routing);
      }
    t0 += it.n;
  }
}

void TrexPool::post(int layer, SiteInput in, const float* x, int64_t ldx, int64_t T) {
  (void)layer;
  (void)in;
  (void)T;
  x_ = x;
  ldx_ = ldx;
}

void TrexPool::wait(int layer, SiteInput in, float* y, int64_t ldy, int64_t T) {
  (void)T;
  if (rows_.empty()) return;
  const int64_t n = int64_t(rows_.size()), E = ad_.E;
  int64_t col = 0;
  for (int i = 0; i < input_site_count(in); ++i) {
    const Site site = Site(int(input_first_site(in)) + i);
    const TrexSite* ts = this->site(layer, site);
    if (ts) {
      s_.resize(size_t(n * E));
      omega_.resize(size_t(n));
      tmp_.resize(size_t(E));
      const SeqRouting* last = nullptr;
      for (int64_t j = 0; j < n; ++j) {
        const SeqRouting* r = seq_[size_t(j)];
        if (r != last) module_intuition(*ts, r->trex_ce, tmp_.data());
        last = r;
        std::copy(tmp_.begin(), tmp_.end(), s_.begin() + j * E);
        omega_[size_t(j)] = r->trex_ctl.omega ? float(*r->trex_ctl.omega) : ts->omega;
      }
      ops::TrexParams p;
      p.x = x_;
      p.ldx = ldx_;
      p.AW = ts->AW.get();
      p.B = ts->B.get();
      p.dtype = ts->AW.dtype;
      p.R = ts->R;
      p.T = n;
      p.d_in = ts->d_in;
      p.d_out = ts->d_out;
      p.r1 = ad_.r1;
      p.r2 = ad_.r2;
      p.E = E;
      p.diagonal = ad_.mode == "rank1";
      p.rows = rows_.data();
      p.s = s_.data();
      p.omega = omega_.data();
      if (!be_->host_memory()) {  // the step's tables into backend memory
        rows_dev_.reserve(*be_, size_t(n) * 4);
        be_->upload(rows_dev_.get(), rows_.data(), size_t(n) * 4);
        s_dev_.reserve(*be_, size_t(n * E) * 4);
        be_->upload(s_dev_.get(), s_.data(), size_t(n * E) * 4);
        omega_dev_.reserve(*be_, size_t(n) * 4);
        be_->upload(omega_dev_.get(), omega_.data(), size_t(n) * 4);
        p.rows = rows_dev_.as<int32_t>();
        p.s = s_dev_.as<float>();
        p.omega = omega_dev_.as<float>();
      }
      p.gate = ts->gate;
      p.y = y + col;
      p.ldy = ldy;
      ws_.reserve(*be_, be_->workspace_bytes(p));
      be_->trex(p, ws_.get());
    }
    col += shapes_.d_out[size_t(site)];
  }
}

}  // namespace atmoe
