// The CPU backend: kernels/cpu/ behind the Backend interface. Memory is 256-byte-aligned
// host memory; weights are prepared into the packed panel layout (matmul.h) and LoRA B
// banks into the block layout (lora.h); ops run on a ThreadPool. The LoRA work lists
// (LoraPlan) are this context's host-side cache: grown once, reused by every call.
#include "kernels/cpu/backend_cpu.h"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>

#include <sys/mman.h>

#include "common/error.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/lora.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/sampling.h"
#include "kernels/cpu/silu_mul.h"
#include "kernels/cpu/softmax.h"
#include "kernels/cpu/trex.h"
#include "kernels/thread_pool.h"

namespace atmoe {
namespace {

constexpr size_t kAlign = 256;
constexpr size_t kHuge = size_t(2) << 20, kHugeMin = size_t(4) << 20;

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(ThreadPool& pool) : pool_(pool) {}
  ~CpuBackend() override { pool_.take_side_job(&beside_job_); }  // never leave the pool a dangling job

  const char* name() const override { return "cpu"; }
  std::string description() const override {
    return fmt::format("cpu {}, {} threads", cpu::isa_name(cpu::best_isa()), pool_.size());
  }
  bool host_memory() const override { return true; }

  // Buffers of kHugeMin bytes or more (weight matrices, an expert shard's arena) start on a
  // 2 MiB boundary and ask for transparent huge pages: a decode step reads them once each,
  // and with 4 KiB pages every page it touches is a TLB miss whose walk waits on DRAM.
  void* alloc(size_t bytes) override {
    const size_t n = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = nullptr;
    if (n >= kHugeMin) {
      if (posix_memalign(&p, kHuge, n) != 0) p = nullptr;
      if (p) madvise(p, n / kHuge * kHuge, MADV_HUGEPAGE);  // a hint: refused or ignored, 4 KiB pages
    } else {
      p = std::aligned_alloc(kAlign, n);
    }
    if (!p) ::atmoe::throw_runtime(__FILE__, __LINE__, fmt::format("cpu backend: allocating {} bytes failed", bytes));
    return p;
  }
  void free(void* p) override { std::free(p); }
  void upload(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void download(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void copy(void* dst, const void* src, size_t n) override { std::memmove(dst, src, n); }
  void copy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t rows) override {
    for (size_t r = 0; r < rows; ++r)
      std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  }
  void memset(void* dst, int v, size_t n) override { std::memset(dst, v, n); }
  void synchronize() override {}

  size_t weight_bytes(int64_t N, int64_t K, DType dt) const override {
    return cpu::packed_elems(N, K) * dtype_size(dt);
  }
  void prepare_weight(const float* w, int64_t N, int64_t K, DType dt, void* dst) override {
    ATMOE_ASSERT(dt == DType::F32 || dt == DType::BF16);
    cpu::pack_weights(w, N, K, dt, dst);
  }
  size_t lora_b_bytes(int64_t d_out, int64_t R, DType dt) const override {
    return cpu::packed_elems(d_out, R) * dtype_size(dt);
  }
  void prepare_lora_b(const float* B, int64_t d_out, int64_t R, DType dt, void* dst) override {
    ATMOE_ASSERT(dt == DType::F32 || dt == DType::BF16);
    cpu::pack_weights(B, d_out, R, dt, dst);  // a block's B is a packed-panel matrix of its own (lora.h)
  }

  size_t workspace_bytes(const ops::MatmulParams& p) const override {
    return size_t(cpu::matmul_workspace_floats(cpu::MatmulParams(p))) * 4;
  }
  void matmul(const ops::MatmulParams& p, void* ws) override {
    cpu::matmul(cpu::MatmulParams(p), static_cast<float*>(ws), pool_);
  }
  void rmsnorm(const ops::RmsNormParams& p) override { cpu::rmsnorm(p, &pool_); }
  void rope(const ops::RopeParams& p) override { cpu::rope(p); }
  void silu_mul(const ops::SiluMulParams& p) override { cpu::silu_mul(p, &pool_); }
  size_t workspace_bytes(const ops::AttentionParams& p) const override {
    return size_t(cpu::attention_workspace_floats(p, pool_.size())) * 4;
  }
  void attention(const ops::AttentionParams& p, void* ws) override {
    cpu::attention(p, static_cast<float*>(ws), pool_);
  }
  size_t workspace_bytes(const ops::LoraMixParams& p) const override {
    return size_t(cpu::lora_workspace_floats(cpu::LoraMixParams(p))) * 4;
  }
  void lora_mix(const ops::LoraMixParams& p, void* ws) override {
    cpu::LoraMixParams c(p);
    c.u = static_cast<float*>(ws);
    c.plan = &plan_;
    cpu::lora_mix_apply(c, pool_);
  }
  // Decode-sized calls only (kLoraBesideMacs), one at a time, and only with a thread to spare.
  bool lora_mix_beside_ok(const ops::LoraMixParams& p) const override {
    return pool_.size() >= 2 && !pool_.side_job_pending() && cpu::lora_mix_macs(p) <= cpu::kLoraBesideMacs;
  }
  bool lora_mix_beside(const ops::LoraMixParams& p, void* ws) override {
    if (!lora_mix_beside_ok(p)) return false;
    beside_ = cpu::LoraMixParams(p);
    beside_.u = static_cast<float*>(ws);
    beside_.plan = &plan_;
    pool_.set_side_job(&beside_job_);
    return true;
  }
  void lora_mix_join() override {
    if (pool_.take_side_job(&beside_job_)) cpu::lora_mix_apply(beside_, pool_);  // no thread took it
  }
  void lora_mix_cancel() override { pool_.take_side_job(&beside_job_); }
  size_t workspace_bytes(const ops::TrexParams& p) const override {
    return size_t(cpu::trex_workspace_floats(cpu::TrexParams(p))) * 4;
  }
  void trex(const ops::TrexParams& p, void* ws) override {
    cpu::TrexParams c(p);
    c.ws = static_cast<float*>(ws);
    cpu::trex_apply(c, pool_);
  }
  void softmax_rows(const ops::SoftmaxParams& p) override {
    if (p.ld == p.C || p.R <= 1) {
      cpu::softmax_rows(p.x, p.R, p.C, p.scale);
      return;
    }
    for (int64_t r = 0; r < p.R; ++r) cpu::softmax_rows(p.x + r * p.ld, 1, p.C, p.scale);
  }
  void sample_rows(const ops::SampleParams& p) override {
    for (int64_t r = 0; r < p.R; ++r) {
      const float* row = p.logits + r * p.ld;
      // Absent knobs take their defaults (ops.h); a sampled row without its draw is a bug.
      const float temp = p.temperature ? p.temperature[r] : 0.f;
      const int top_k = p.top_k ? p.top_k[r] : 0;
      if (temp >= 1e-5f && top_k != 1) ATMOE_ASSERT(p.u != nullptr);
      p.out[r] = cpu::sample_with_u(row, p.V, temp, top_k, p.top_p ? p.top_p[r] : 1.f, p.min_p ? p.min_p[r] : 0.f,
                                    p.u ? p.u[r] : 0.0, scratch_);
    }
  }

 private:
  ThreadPool& pool_;
  cpu::LoraPlan plan_;
  // lora_mix_beside: its params, and the side job that runs them on the thread that takes it.
  cpu::LoraMixParams beside_;
  const std::function<void(int)> beside_job_ = [this](int tid) {
    cpu::lora_mix_apply_alone(beside_, pool_.size(), tid);
  };
  std::vector<std::pair<float, int32_t>> scratch_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(ThreadPool* pool) {
  return std::make_unique<CpuBackend>(pool ? *pool : ThreadPool::global());
}

}  // namespace atmoe
