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
  PreparedWeight AW, B;  // the backend's: [R = r1 + E, d_in] (A rows, then W_r rows), [d_out, r2]
  float omega = 0.5f, gate = 1.f;  // σ(100ω), σ(100γ)
  Tensor M;                        // f32 [E, K] or undefined
};

// A bundle's centroids, checked: safetensors key "centroids" [K, d_e], or a .npy file of a
// 2-D float array (InputError naming the file otherwise).
Tensor load_centroids(const std::string& path);

// T-REX bundles run in the coordinator's process (one adapter of rank-1 experts: no
// groups to shard; docs/deploy.md).
class TrexPool : public ExpertDispatch {
 public:
  // be: where the experts live and run (nullptr: a CPU context of its own); activations given to
  // post/wait are in its memory.
  TrexPool(const Bundle& b, const ModelConfig& c, DType dtype, Backend* be = nullptr);
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
  std::unique_ptr<SeqRouting> new_routing(const RoutingControls& c) const override;
  // ExpertDispatch: T-REX routes inside each module (kernels/cpu/trex.h); route() collects
  // the rows that use the experts, wait() runs every adapted site of the input.
  bool needs_whole_prompt() const override { return b_.trex->intuition_from_hidden; }
  void begin_step(Model& m, const std::vector<ForwardItem>& items) override;
  void route(int layer, const std::vector<ForwardItem>& items, const float* h, int64_t ldh, int64_t T) override;
  bool route_reads_rows(const std::vector<ForwardItem>&) const override { return false; }
  void post(int layer, SiteInput in, const float* x, int64_t ldx, int64_t T) override;
  void wait(int layer, SiteInput in, float* y, int64_t ldy, int64_t T) override;

 private:
  Bundle b_;
  std::unique_ptr<Backend> own_be_;
  Backend* be_;
  SiteShapes shapes_;
  TrexAdapter ad_;
  Tensor C_;  // f32 [K, d_e]
  std::vector<std::unique_ptr<TrexSite>> sites_;  // [L * kNumSites], null when not adapted
  // Step scratch: rows that route, their sequences, per-row intuition and ω'.
  std::vector<int32_t> rows_;
  std::vector<SeqRouting*> seq_;
  std::vector<float> s_, omega_, tmp_;
  Buffer ws_, rows_dev_, s_dev_, omega_dev_;  // workspace; the step's tables (device backends)
  const float* x_ = nullptr;
  int64_t ldx_ = 0;
};

}  // namespace atmoe
