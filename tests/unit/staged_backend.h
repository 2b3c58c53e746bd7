// A stand-in for a device backend in CPU tests (tests/unit/test_model.cpp,
// test_experts.cpp).
#pragma once
#include <memory>
#include <string>

#include "kernels/backend.h"

namespace atmoe::test {

// A backend whose memory the model must treat as device memory: the CPU backend behind the
// interface, but host_memory() false, so the model takes the paths a GPU takes (embedding
// rows staged and uploaded, logits and pooled states downloaded) and counts them. Its
// results must be the CPU's bit for bit: the same kernels run in the same order.
class StagedCpu final : public Backend {
 public:
  StagedCpu() : in_(make_backend("cpu")) {}
  const char* name() const override { return "staged-cpu"; }
  std::string description() const override { return "cpu behind device-memory paths (test)"; }
  bool host_memory() const override { return false; }
  void* alloc(size_t n) override { return in_->alloc(n); }
  void free(void* p) override { in_->free(p); }
  void upload(void* d, const void* s, size_t n) override { ++uploads, in_->upload(d, s, n); }
  void download(void* d, const void* s, size_t n) override { ++downloads, in_->download(d, s, n); }
  void copy(void* d, const void* s, size_t n) override { in_->copy(d, s, n); }
  void copy_2d(void* d, size_t dp, const void* s, size_t sp, size_t w, size_t r) override {
    in_->copy_2d(d, dp, s, sp, w, r);
  }
  void memset(void* d, int v, size_t n) override { in_->memset(d, v, n); }
  void synchronize() override {}
  size_t weight_bytes(int64_t N, int64_t K, DType dt) const override { return in_->weight_bytes(N, K, dt); }
  void prepare_weight(const float* w, int64_t N, int64_t K, DType dt, void* d) override {
    in_->prepare_weight(w, N, K, dt, d);
  }
  size_t lora_b_bytes(int64_t o, int64_t R, DType dt) const override { return in_->lora_b_bytes(o, R, dt); }
  void prepare_lora_b(const float* B, int64_t o, int64_t R, DType dt, void* d) override {
    in_->prepare_lora_b(B, o, R, dt, d);
  }
  size_t workspace_bytes(const ops::MatmulParams& p) const override { return in_->workspace_bytes(p); }
  void matmul(const ops::MatmulParams& p, void* ws) override { in_->matmul(p, ws); }
  void rmsnorm(const ops::RmsNormParams& p) override { in_->rmsnorm(p); }
  void rope(const ops::RopeParams& p) override { in_->rope(p); }
  void silu_mul(const ops::SiluMulParams& p) override { in_->silu_mul(p); }
  size_t workspace_bytes(const ops::AttentionParams& p) const override { return in_->workspace_bytes(p); }
  void attention(const ops::AttentionParams& p, void* ws) override { in_->attention(p, ws); }
  size_t workspace_bytes(const ops::LoraMixParams& p) const override { return in_->workspace_bytes(p); }
  void lora_mix(const ops::LoraMixParams& p, void* ws) override { in_->lora_mix(p, ws); }
  size_t workspace_bytes(const ops::TrexParams& p) const override { return in_->workspace_bytes(p); }
  void trex(const ops::TrexParams& p, void* ws) override { in_->trex(p, ws); }
  void softmax_rows(const ops::SoftmaxParams& p) override { in_->softmax_rows(p); }
  void sample_rows(const ops::SampleParams& p) override { in_->sample_rows(p); }
  int uploads = 0, downloads = 0;

 private:
  std::unique_ptr<Backend> in_;
};

}  // namespace atmoe::test
