#include "coordinator/experts.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "common/error.h"
#include "common/clock.h"
#include "common/log.h"
#include "coordinator/model.h"
#include "kernels/thread_pool.h"

namespace atmoe {

namespace {
std::vector<int> all_groups(const Bundle& b) {
  std::vector<int> g(b.groups.size());
  std::iota(g.begin(), g.end(), 0);
  return g;
}
}  // namespace

LocalExperts::LocalExperts(const Bundle& b, const ModelConfig& c, DType dtype)
    : shard_(b, shard_spec(c, dtype, all_groups(b), b.general.has_value())) {}

void LocalExperts::set_layer(int layer, const StepRouting& r) {
  (void)layer;
  // The shard's columns from the bundle's: a gather of [T, E + 1] into [T, shard columns].
  const auto& ce = shard_.column_expert();
  const size_t nc = ce.size();
  coef_.resize(size_t(r.T) * nc);
  for (int64_t t = 0; t < r.T; ++t)
    for (size_t c = 0; c < nc; ++c) coef_[size_t(t) * nc + c] = r.coef[size_t(t * r.C + ce[c])];
}

void LocalExperts::post(int layer, SiteInput in, const float* x, int64_t ldx, const StepRouting& r) {
  (void)layer;
  (void)in;
  (void)r;
  x_ = x;
  ldx_ = ldx;
}

void LocalExperts::wait(int layer, SiteInput in, float* y, int64_t ldy, const StepRouting& r) {
  shard_.apply(layer, in, x_, ldx_, coef_.data(), int64_t(shard_.column_expert().size()), y, ldy, r.T,
               ThreadPool::global());
}

ExpertPool::ExpertPool(const Bundle& b, const ModelConfig& c, DType dtype)
    : ExpertPool(b, c, std::unique_ptr<ExpertBackend>()) {
  ATMOE_ASSERT(dtype == DType::F32 || dtype == DType::BF16);
  backend_ = std::make_unique<LocalExperts>(b_, c, dtype);
}

ExpertPool::ExpertPool(const Bundle& b, const ModelConfig& c, std::unique_ptr<ExpertBackend> backend)
    : b_(b), n_layers_(c.n_layers), hidden_(c.hidden), backend_(std::move(backend)) {
  router_ = std::make_unique<Router>(b_, c.n_layers, c.hidden);
  ATMOE_LOG("coord")->info("bundle {}: {} groups, {} experts{}", b_.dir, b_.groups.size(), b_.experts.size(),
                           b_.general ? " + general" : "");
}

ExpertPool::~ExpertPool() = default;

const ExpertShard* ExpertPool::local_shard() const {
  auto* l = dynamic_cast<const LocalExperts*>(backend_.get());
  return l ? &l->shard() : nullptr;
}

std::unique_ptr<SeqRouting> ExpertPool::new_routing(const RoutingControls& c) const {
  auto r = std::make_unique<SeqRouting>();
  r->ctl = resolve_routing(b_, c);
  return r;
}

// Routing weights of every token row for layer `layer`, from the router input h (the
// normalised attention input). per_request: the mean of h over the prompt, computed once
// (the first forward of a sequence holds its whole prompt) and reused while decoding.
void ExpertPool::route(int layer, const std::vector<ForwardItem>& items, const float* h, int64_t ldh, int64_t T) {
  const double t_start = now_s();
  const int E = n_experts(), G = int(b_.groups.size());
  const int64_t d = hidden_;
  const bool per_token = b_.router_input == RouterInput::PerToken;
  const bool has_general = b_.general.has_value();
  StepRouting& s = step_;
  const int C = E + 1;
  s.T = T;
  s.C = C;
  s.coef.assign(size_t(T * C), 0.f);
  s.active = false;
  ra_.resize(size_t(G));
  rw_.resize(size_t(E));
  umean_.resize(size_t(d));
  int64_t t0 = 0;
  for (const auto& it : items) {
    SeqRouting* r = it.routing;
    if (r && !r->ctl.off) {
      s.active = true;
      const float lam = float(r->ctl.lambda);
      const float gen = has_general && r->ctl.adapter < 0 ? 1.f - lam : 0.f;
      if (r->a.empty()) {
        r->a.assign(size_t(n_layers_), std::vector<double>(size_t(G), 0.0));
        r->w.assign(size_t(n_layers_), std::vector<double>(size_t(E), 0.0));
      }
      if (!per_token) {
        if (!r->per_request_done) {
          ATMOE_ASSERT(it.cache->len() == 0);  // the whole prompt is in this forward
          std::fill(umean_.begin(), umean_.end(), 0.f);
          for (int64_t j = 0; j < it.n; ++j)
            for (int64_t i = 0; i < d; ++i) umean_[size_t(i)] += h[(t0 + j) * ldh + i];
          for (auto& v : umean_) v /= float(it.n);
          router_->route(layer, umean_.data(), r->ctl, r->a[size_t(layer)].data(), r->w[size_t(layer)].data());
          if (layer == n_layers_ - 1) r->per_request_done = true;
        }
        for (int64_t j = 0; j < it.n; ++j) {
          for (int e = 0; e < E; ++e) s.coef[size_t((t0 + j) * C + e)] = lam * float(r->w[size_t(layer)][size_t(e)]);
          s.coef[size_t((t0 + j) * C + E)] = gen;
        }
      } else {
        for (int64_t j = 0; j < it.n; ++j) {
          router_->route(layer, h + (t0 + j) * ldh, r->ctl, ra_.data(), rw_.data());
          for (int e = 0; e < E; ++e) s.coef[size_t((t0 + j) * C + e)] = lam * float(rw_[size_t(e)]);
          s.coef[size_t((t0 + j) * C + E)] = gen;
          // Running mean over tokens for the request-level trace; per-token detail if asked.
          const double k = double(r->n_token_steps + j);
          for (int g = 0; g < G; ++g)
            r->a[size_t(layer)][size_t(g)] += (ra_[size_t(g)] - r->a[size_t(layer)][size_t(g)]) / (k + 1);
          for (int e = 0; e < E; ++e)
            r->w[size_t(layer)][size_t(e)] += (rw_[size_t(e)] - r->w[size_t(layer)][size_t(e)]) / (k + 1);
          if (r->trace_tokens) {
            size_t tok = size_t(r->n_token_steps + j);
            if (r->tokens.size() <= tok) {
              r->tokens.resize(tok + 1, std::vector<std::vector<double>>(size_t(n_layers_)));
              r->tokens_groups.resize(tok + 1, std::vector<std::vector<double>>(size_t(n_layers_)));
            }
            r->tokens[tok][size_t(layer)] = rw_;
            r->tokens_groups[tok][size_t(layer)] = ra_;
          }
        }
        if (layer == n_layers_ - 1) r->n_token_steps += it.n;
      }
    }
    t0 += it.n;
  }
  if (s.active) backend_->set_layer(layer, s);
  times_.route_s += now_s() - t_start;
}

void ExpertPool::post(int layer, SiteInput in, const float* x, int64_t ldx, int64_t T) {
  ATMOE_ASSERT(T == step_.T);
  if (!step_.active) return;
  const double t0 = now_s();
  backend_->post(layer, in, x, ldx, step_);
  times_.post_s += now_s() - t0;
}

void ExpertPool::wait(int layer, SiteInput in, float* y, int64_t ldy, int64_t T) {
  ATMOE_ASSERT(T == step_.T);
  if (!step_.active) return;
  const double t0 = now_s();
  backend_->wait(layer, in, y, ldy, step_);
  times_.wait_s += now_s() - t0;
}

}  // namespace atmoe
