// The T-REX experts of a bundle (method "t-rex"): per adapted module the stacked [A; W_r]
// and B of kernels/cpu/trex.h in the model's dtype, σ(100ω), σ(100γ), the optional mapper,
// and the K cluster centroids C that turn a request's embedding e into its intuition:
//   s = M (C e)  with router_mapping,  else  s = C e  (repeated to E entries where the
//   released code repeats it), e L2-normalised.
#pragma once
#include <memory>
#include <vector>

#include "common/bundle.h"
#include "common/model_config.h"
#include "common/trex_adapter.h"
#include "coordinator/experts.h"

namespace atmoe {

struct TrexSite {
  int64_t R = 0, d_in = 0, d_out = 0;
  Tensor AW, B;  // packed: [R, d_in] (A rows, then W_r rows, padded), [d_out, r2]
  float omega = 0.5f, gate = 1.f;  // σ(100ω), σ(100γ)
  Tensor M;                        // f32 [E, K] or undefined
};

class TrexPool {
 public:
  TrexPool(const Bundle& b, const ModelConfig& c, DType dtype);
  const Bundle& bundle() const { return b_; }
  const TrexAdapter& adapter() const { return ad_; }
  const TrexSite* site(int layer, Site s) const;
  int K() const { return int(C_.dim(0)); }
  int64_t d_e() const { return C_.dim(1); }
  // C e for an embedding e (L2-normalised here); cluster k pins e to centroid k.
  std::vector<float> cluster_scores(const float* e, int64_t n) const;
  std::vector<float> cluster_scores_pinned(int k) const;
  // The intuition term s ([E]) of one module from the cluster scores ce ([K]).
  void module_intuition(const TrexSite& s, const std::vector<float>& ce, float* out) const;
  // Routing state of one request; InputError for AT-MoE-only controls or a missing embedding.
  std::unique_ptr<SeqRouting> new_routing(const RoutingControls& c) const;

 private:
  Bundle b_;
  TrexAdapter ad_;
  Tensor C_;  // f32 [K, d_e]
  std::vector<std::unique_ptr<TrexSite>> sites_;  // [L * kNumSites], null when not adapted
};

}  // namespace atmoe
