// The backend interface (DESIGN.md 3, "Backend"): the ops of kernels/ops.h behind one
// interface chosen at run time, as ggml's backends. Callers (the model, the expert shards,
// the op tests) hold a Backend& and never include a CUDA header or test a build flag.
//
// A Backend object is an *execution context*: the CPU backend runs its ops on a thread
// pool, the CUDA backend enqueues them on its stream. Ops issued on one backend object run
// in issue order; a backend object is used by one caller at a time (as a stream is).
//
// Conventions every implementation follows:
//   - memory: alloc() returns 256-byte-aligned, uninitialised backend memory (host memory
//     for the CPU backend, device memory for CUDA); Buffer owns it. upload/copy/memset are
//     ordered with the ops; download() waits for them (its result is ready on return).
//   - weights: prepare_weight() turns a row-major [N, K] f32 matrix into the backend's own
//     layout in F32 or BF16 (round to nearest even); weight_bytes() says how many bytes.
//     No caller knows the layout (the CPU's packed panels are the CPU backend's choice).
//   - workspace: op X with a workspace has a size query workspace_bytes(const XParams&)
//     and takes `void* ws` of at least that many bytes of backend memory; ops never
//     allocate (the CPU backend grows its own host-side work lists once, as a plan cache).
//   - errors: a failed allocation, a bad launch or a device fault throws atmoe::Error
//     (RuntimeError) naming the call.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "kernels/ops.h"

namespace atmoe {

class ThreadPool;

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const char* name() const = 0;         // "cpu", "cuda"
  virtual std::string description() const = 0;  // e.g. "cpu avx2, 2 threads", "cuda:0 NVIDIA H100 80GB HBM3"
  virtual bool host_memory() const = 0;         // backend memory is host memory (pointers may be read directly)

  // ---- memory
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* p) = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  // `rows` rows of `width` bytes from src (row stride spitch bytes) to dst (stride dpitch).
  virtual void copy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t rows) = 0;
  virtual void memset(void* dst, int value, size_t bytes) = 0;
  virtual void synchronize() = 0;

  // ---- weight preparation
  virtual size_t weight_bytes(int64_t N, int64_t K, DType dt) const = 0;
  virtual void prepare_weight(const float* w, int64_t N, int64_t K, DType dt, void* dst) = 0;
  // The lora_B of one LoRA block (ops::LoraBlock::B): B row-major [d_out, R] f32 (R: the
  // block's rank rows) in the backend's layout.
  virtual size_t lora_b_bytes(int64_t d_out, int64_t R, DType dt) const = 0;
  virtual void prepare_lora_b(const float* B, int64_t d_out, int64_t R, DType dt, void* dst) = 0;

  // ---- ops (kernels/ops.h)
  virtual size_t workspace_bytes(const ops::MatmulParams& p) const = 0;
  virtual void matmul(const ops::MatmulParams& p, void* ws) = 0;
  virtual void rmsnorm(const ops::RmsNormParams& p) = 0;
  virtual void rope(const ops::RopeParams& p) = 0;
  virtual void silu_mul(const ops::SiluMulParams& p) = 0;
  virtual size_t workspace_bytes(const ops::AttentionParams& p) const = 0;
  virtual void attention(const ops::AttentionParams& p, void* ws) = 0;
  virtual size_t workspace_bytes(const ops::LoraMixParams& p) const = 0;
  virtual void lora_mix(const ops::LoraMixParams& p, void* ws) = 0;
  // lora_mix(p) beside the next parallel op instead of now (the CPU: a side job of this
  // backend's pool, run by one of its threads while the others run the next parallel_for on
  // that pool, the model's base GEMM; ThreadPool::set_side_job). lora_mix_beside_ok(p):
  // whether it would (callers point p at rows of their own first). p, ws and everything p
  // points to must stay as they are until lora_mix_join() or lora_mix_cancel().
  virtual bool lora_mix_beside_ok(const ops::LoraMixParams& p) const {
    (void)p;
    return false;
  }
  virtual bool lora_mix_beside(const ops::LoraMixParams& p, void* ws) {
    (void)p;
    (void)ws;
    return false;
  }
  // After the op that followed lora_mix_beside: the pending lora_mix has finished when this
  // returns (run here when no thread took it).
  virtual void lora_mix_join() {}
  // Drops a pending lora_mix_beside: not run if no thread took it yet, finished if one did.
  virtual void lora_mix_cancel() {}
  virtual size_t workspace_bytes(const ops::TrexParams& p) const = 0;
  virtual void trex(const ops::TrexParams& p, void* ws) = 0;
  virtual void softmax_rows(const ops::SoftmaxParams& p) = 0;
  virtual void sample_rows(const ops::SampleParams& p) = 0;
};

// Owned backend memory (move-only). Undefined when default-constructed.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& be, size_t bytes) : be_(&be), bytes_(bytes), p_(bytes ? be.alloc(bytes) : nullptr) {}
  ~Buffer() { reset(); }
  Buffer(Buffer&& o) noexcept : be_(o.be_), bytes_(o.bytes_), p_(o.p_) {
    o.be_ = nullptr, o.bytes_ = 0, o.p_ = nullptr;
  }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      reset();
      be_ = o.be_, bytes_ = o.bytes_, p_ = o.p_;
      o.be_ = nullptr, o.bytes_ = 0, o.p_ = nullptr;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void reset() {
    if (p_) be_->free(p_);
    p_ = nullptr;
    bytes_ = 0;
  }
  // Grows to at least `bytes` (contents are not kept); never shrinks.
  void reserve(Backend& be, size_t bytes) {
    if (bytes <= bytes_ && be_ == &be) return;
    reset();
    be_ = &be;
    p_ = bytes ? be.alloc(bytes) : nullptr;
    bytes_ = bytes;
  }
  size_t bytes() const { return bytes_; }
  void* get() const { return p_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  Backend* be_ = nullptr;
  size_t bytes_ = 0;
  void* p_ = nullptr;
};

// A weight matrix prepared for one backend (kernels/backend.cpp).
struct PreparedWeight {
  Buffer buf;
  DType dtype = DType::F32;
  int64_t N = 0, K = 0;
  const void* get() const { return buf.get(); }
};
PreparedWeight prepare_weight(Backend& be, const float* w, int64_t N, int64_t K, DType dt);

// ---- registry (kernels/backend_registry.cpp): the backends this build has.
// Names of the backends compiled in ("cpu" always; "cuda" in CUDA builds).
std::vector<std::string> backend_names();
// True when `name` is compiled in and can run here (a CUDA build without a usable GPU: false,
// with the reason in `why`).
bool backend_available(const std::string& name, std::string* why = nullptr);
// A new execution context of backend `name` ("cpu" or "cuda[:N]"). The CPU backend runs on
// `pool` (the global pool when nullptr). Throws InputError for an unknown name and Error when
// it cannot run here.
std::unique_ptr<Backend> make_backend(const std::string& name, ThreadPool* pool = nullptr);
// The process-wide CPU backend on ThreadPool::global().
Backend& cpu_backend();

}  // namespace atmoe
