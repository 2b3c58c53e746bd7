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

namespace {
ShardSpec local_spec(const Bundle& b, const ModelConfig& c, DType dtype, Backend* be) {
  ShardSpec s = shard_spec(c, dtype, all_groups(b), b.general.has_value());
  s.backend = be;
  return s;
}
}  // namespace

LocalExperts::LocalExperts(const Bundle& b, const ModelConfig& c, DType dtype, Backend* be)
    : shard_(b, local_spec(b, c, dtype, be)) {}

void LocalExperts::set_layer(int layer, const StepRouting& r) {
  (void)layer;
  // The shard's columns from the bundle's, then the run-time adapters': a gather of [T, C]
  // into [T, shard columns + adapters].
  const auto& ce = shard_.column_expert();
  const size_t nc = ce.size(), ld = nc + adapters_.size();
  coef_.resize(size_t(r.T) * ld);
  for (int64_t t = 0; t < r.T; ++t) {
    for (size_t c = 0; c < nc; ++c) coef_[size_t(t) * ld + c] = r.coef[size_t(t * r.C + ce[c])];
    for (size_t k = 0; k < adapters_.size(); ++k)
      coef_[size_t(t) * ld + nc + k] = r.coef[size_t(t * r.C + adapters_[k].first)];
  }
}

std::string LocalExperts::load_adapter(int col, const std::string& name, const std::string& dir, int group) {
  (void)group;
  adapters_.emplace_back(col, adapter_shard(shard_.spec(), name, dir));
  return "rank 0";
}

void LocalExperts::unload_adapter(int col) {
  adapters_.erase(std::remove_if(adapters_.begin(), adapters_.end(), [&](const auto& a) { return a.first == col; }),
                  adapters_.end());
}

void LocalExperts::post(int layer, SiteInput in, const float* x, int64_t ldx, const StepRouting& r) {
  x_ = x;
  ldx_ = ldx;
  // The shard's experts beside the base GEMM that follows (ExpertShard::post); the
  // run-time adapters' in wait().
  const int64_t ld = int64_t(shard_.column_expert().size() + adapters_.size());
  posted_ = shard_.post(layer, in, x, ldx, coef_.data(), ld, r.T);
}

void LocalExperts::wait(int layer, SiteInput in, float* y, int64_t ldy, const StepRouting& r) {
  const int64_t nc = int64_t(shard_.column_expert().size()), ld = nc + int64_t(adapters_.size());
  if (posted_)
    shard_.finish(y, ldy);
  else
    shard_.apply(layer, in, x_, ldx_, coef_.data(), ld, y, ldy, r.T);
  posted_ = false;
  for (size_t k = 0; k < adapters_.size(); ++k)
    adapters_[k].second->apply(layer, in, x_, ldx_, coef_.data() + nc + int64_t(k), ld, y, ldy, r.T);
}

ExpertPool::ExpertPool(const Bundle& b, const ModelConfig& c, DType dtype, bool zero_router, Backend* be)
    : ExpertPool(b, c, std::unique_ptr<ExpertBackend>(), zero_router) {
  ATMOE_ASSERT(dtype == DType::F32 || dtype == DType::BF16);
  backend_ = std::make_unique<LocalExperts>(b_, c, dtype, be);
}

ExpertPool::ExpertPool(const Bundle& b, const ModelConfig& c, std::unique_ptr<ExpertBackend> backend,
                       bool zero_router)
    : b_(b), n_layers_(c.n_layers), hidden_(c.hidden), backend_(std::move(backend)) {
  router_ = std::make_unique<Router>(b_, c.n_layers, c.hidden, zero_router);
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
  if (!c.adapter.empty() && b_.expert_index(c.adapter) < 0) {
    std::lock_guard<std::mutex> l(slots_mu_);
    for (size_t k = 0; k < slots_.size(); ++k)
      if (slots_[k].live && slots_[k].info.name == c.adapter) {
        ATMOE_CHECK_INPUT(c.atmoe_set().size() == 1 && c.trex_set().empty() && !c.off,
                          "routing: adapter '{}' is served alone at weight 1; it cannot be combined with other "
                          "routing controls",
                          c.adapter);
        r->adapter_slot = int(k);
        r->adapter_lease = slots_[k].lease;
        r->ctl.lambda = 1;
        return r;
      }
  }
  r->ctl = resolve_routing(b_, c);
  return r;
}

void ExpertPool::set_max_adapters(int n) {
  ATMOE_CHECK_INPUT(n >= 0 && n <= 1024, "--max-loras {}: must be in 0..1024", n);
  std::lock_guard<std::mutex> l(slots_mu_);
  ATMOE_ASSERT(std::none_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.loaded; }));
  slots_.assign(size_t(n), Slot{});
}

void ExpertPool::load_adapter(const std::string& name, const std::string& dir, const std::string& group) {
  collect_adapters();
  const int g = group.empty() ? -1 : b_.group_index(group);
  ATMOE_CHECK_INPUT(group.empty() || g >= 0, "group '{}': not a group of this bundle", group);
  size_t free = slots_.size();
  {
    std::lock_guard<std::mutex> l(slots_mu_);
    ATMOE_CHECK_INPUT(b_.expert_index(name) < 0, "adapter '{}': an expert of the bundle has that name", name);
    for (size_t k = 0; k < slots_.size(); ++k) {
      ATMOE_CHECK_INPUT(!(slots_[k].live && slots_[k].info.name == name), "adapter '{}' is already loaded", name);
      if (!slots_[k].loaded && free == slots_.size()) free = k;
    }
    ATMOE_CHECK_INPUT(free < slots_.size(),
                      "adapter '{}': every one of the {} adapter slots is in use (unload one, or raise --max-loras)",
                      name, slots_.size());
  }
  const int col = int(b_.experts.size()) + 1 + int(free);
  const std::string where = backend_->load_adapter(col, name, dir, g);
  std::lock_guard<std::mutex> l(slots_mu_);
  Slot& s = slots_[free];
  s.info = {name, dir, group, where};
  s.live = s.loaded = true;
  s.lease = std::make_shared<int>(0);
  ATMOE_LOG("coord")->info("adapter '{}' loaded from {} on {} (slot {})", name, dir, where, free);
}

bool ExpertPool::unload_adapter(const std::string& name) {
  {
    std::lock_guard<std::mutex> l(slots_mu_);
    auto it = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.live && s.info.name == name; });
    if (it == slots_.end()) return false;
    it->live = false;  // no new request gets it
  }
  collect_adapters();
  return true;
}

void ExpertPool::collect_adapters() {
  for (size_t k = 0; k < slots_.size(); ++k) {
    {
      std::lock_guard<std::mutex> l(slots_mu_);
      Slot& s = slots_[k];
      if (s.live || !s.loaded || s.lease.use_count() > 1) continue;
    }
    backend_->unload_adapter(int(b_.experts.size()) + 1 + int(k));
    std::lock_guard<std::mutex> l(slots_mu_);
    ATMOE_LOG("coord")->info("adapter '{}' unloaded (slot {})", slots_[k].info.name, k);
    slots_[k] = Slot{};
  }
}

bool ExpertPool::has_adapter(const std::string& name) const {
  std::lock_guard<std::mutex> l(slots_mu_);
  return std::any_of(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.live && s.info.name == name; });
}

std::vector<ExpertPool::AdapterInfo> ExpertPool::adapters() const {
  std::lock_guard<std::mutex> l(slots_mu_);
  std::vector<AdapterInfo> out;
  for (const Slot& s : slots_)
    if (s.live) out.push_back(s.info);
  return out;
}

// Routing weights of every token row for layer `layer`, from the router input h (the
// normalised attention input). per_request: the mean of h over the prompt, computed once
// (the first forward of a sequence holds its whole prompt) and reused while decoding.
// h is read by per_token routing, by a per_request prompt's first forward, and when the
// inputs are kept (fit-router).
bool ExpertPool::route_reads_rows(const std::vector<ForwardItem>& items) const {
  for (const auto& it : items) {
    const SeqRouting* r = it.routing;
    if (!r || r->adapter_slot >= 0 || r->ctl.off) continue;
    if (b_.router_input == RouterInput::PerToken || !r->per_request_done || r->keep_inputs) return true;
  }
  return false;
}

void ExpertPool::route(int layer, const std::vector<ForwardItem>& items, const float* h, int64_t ldh, int64_t T) {
  const double t_start = now_s();
  const int E = n_experts(), G = int(b_.groups.size());
  const int64_t d = hidden_;
  const bool per_token = b_.router_input == RouterInput::PerToken;
  const bool has_general = b_.general.has_value();
  StepRouting& s = step_;
  const int C = E + 1 + int(slots_.size());
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
    if (r && r->adapter_slot >= 0) {  // a run-time adapter alone at weight 1
      s.active = true;
      for (int64_t j = 0; j < it.n; ++j) s.coef[size_t((t0 + j) * C + E + 1 + r->adapter_slot)] = 1.f;
    } else if (r && !r->ctl.off) {
      s.active = true;
      const float lam = float(r->ctl.lambda);
      const float gen = has_general && r->ctl.adapter < 0 ? 1.f - lam : 0.f;
      if (r->a.empty()) {
        r->a.assign(size_t(n_layers_), std::vector<double>(size_t(G), 0.0));
        r->w.assign(size_t(n_layers_), std::vector<double>(size_t(E), 0.0));
        if (r->keep_inputs) r->inputs.assign(size_t(n_layers_), {});
      }
      if (!per_token) {
        if (!r->per_request_done) {
          ATMOE_ASSERT(it.cache->len() == 0);  // the whole prompt is in this forward
          std::fill(umean_.begin(), umean_.end(), 0.f);
          for (int64_t j = 0; j < it.n; ++j)
            for (int64_t i = 0; i < d; ++i) umean_[size_t(i)] += h[(t0 + j) * ldh + i];
          for (auto& v : umean_) v /= float(it.n);
          if (r->keep_inputs) r->inputs[size_t(layer)] = umean_;
          router_->route(layer, umean_.data(), r->ctl, r->a[size_t(layer)].data(), r->w[size_t(layer)].data());
          if (layer == n_layers_ - 1) r->per_request_done = true;
        }
        for (int64_t j = 0; j < it.n; ++j) {
          for (int e = 0; e < E; ++e) s.coef[size_t((t0 + j) * C + e)] = lam * float(r->w[size_t(layer)][size_t(e)]);
          s.coef[size_t((t0 + j) * C + E)] = gen;
        }
      } else {
        if (r->keep_inputs)
          for (int64_t j = 0; j < it.n; ++j)
            r->inputs[size_t(layer)].insert(r->inputs[size_t(layer)].end(), h + (t0 + j) * ldh, h + (t0 + j) * ldh + d);
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
