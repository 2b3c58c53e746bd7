// CudaBackend: the ops of kernels/ops.h on one CUDA device, enqueued on one non-blocking
// stream (kernels/backend.h). Host C++ (g++); the kernels are in kernels/cuda/*.cu behind
// the light launchers of the .cuh files.
//
// Memory and ordering:
//   - alloc/free: cudaMalloc/cudaFree (256-byte aligned). free() never throws (it runs in
//     destructors); after a device fault its error is left for the next checked call.
//   - upload: up to kStageUploadMax bytes are copied into a pinned staging slot and sent
//     with cudaMemcpyAsync (the caller may reuse its buffer at once; the call does not wait
//     for the device); larger uploads are a cudaMemcpyAsync from the caller's memory
//     followed by cudaStreamSynchronize (they are weights, at load time).
//   - download: cudaMemcpyAsync + cudaStreamSynchronize: the data are there on return.
//   - staging: a ring of kStageSlots pinned slots, each with an event recorded after its
//     last copy; a slot is reused only after its event has completed. Descriptor tables of
//     attention and lora_mix are built directly in a slot and uploaded into the op's
//     workspace with one copy.
// Prepared layouts: weights row-major [N, K] (F32 or BF16, round to nearest even on the
// host); a LoRA block's B transposed, row-major [rows, d_out] (kernels/cuda/lora.cuh).
#include "kernels/cuda/backend_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/error.h"
#include "kernels/cpu/sampling.h"  // cpu::sample_with_u: the sampled rows of sample_rows
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/lora.cuh"
#include "kernels/cuda/matmul.cuh"
#include "kernels/cuda/rmsnorm.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/sample.cuh"
#include "kernels/cuda/silu_mul.cuh"
#include "kernels/cuda/softmax.cuh"
#include "kernels/cuda/trex.cuh"

namespace atmoe {
namespace {

constexpr size_t kCublasWorkspace = size_t(32) << 20;  // cuBLAS's recommendation for Hopper
constexpr size_t kStageUploadMax = size_t(1) << 20;
constexpr int kStageSlots = 16;
constexpr size_t kStageMinBytes = size_t(64) << 10;

#define ATMOE_CUDA_REQUIRE(cond, ...)                                                  \
  do {                                                                                 \
    if (!(cond)) ::atmoe::throw_runtime(__FILE__, __LINE__, fmt::format(__VA_ARGS__)); \
  } while (0)

template <class T>
void put(void* base, size_t off, const T& v) {
  std::memcpy(static_cast<char*>(base) + off, &v, sizeof(T));
}

bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

void check_wtype(DType dt, const char* what) {
  ATMOE_CUDA_REQUIRE(dt == DType::F32 || dt == DType::BF16, "cuda {}: weights must be F32 or BF16, got {}", what,
                     dtype_name(dt));
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override { release(); }
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const char* name() const override { return "cuda"; }
  std::string description() const override {
    return fmt::format("cuda:{} {}, {} SMs, {:.1f} GiB", dev_, prop_.name, prop_.multiProcessorCount,
                       double(prop_.totalGlobalMem) / double(size_t(1) << 30));
  }
  bool host_memory() const override { return false; }

  // Every call runs on this backend's device, whichever device the calling thread had
  // current (cuda:N next to other backends or threads).
  void bind() const {
    int cur = -1;
    ATMOE_CUDA_CHECK(cudaGetDevice(&cur));
    if (cur != dev_) ATMOE_CUDA_CHECK(cudaSetDevice(dev_));
  }

  // ---- memory
  void* alloc(size_t bytes) override;
  void free(void* p) override {
    if (!p) return;
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != dev_) cudaSetDevice(dev_);
    cudaFree(p);
  }
  void upload(void* dst, const void* host_src, size_t bytes) override;
  void download(void* host_dst, const void* src, size_t bytes) override;
  void copy(void* dst, const void* src, size_t bytes) override {
    bind();
    if (bytes) ATMOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  void copy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t rows) override {
    bind();
    if (width && rows)
      ATMOE_CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyDeviceToDevice, stream_));
  }
  void memset(void* dst, int value, size_t bytes) override {
    bind();
    if (bytes) ATMOE_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, stream_));
  }
  void synchronize() override {
    bind();
    ATMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // ---- weight preparation
  size_t weight_bytes(int64_t N, int64_t K, DType dt) const override {
    check_wtype(dt, "weight_bytes");
    return size_t(N) * size_t(K) * dtype_size(dt);
  }
  void prepare_weight(const float* w, int64_t N, int64_t K, DType dt, void* dst) override;
  size_t lora_b_bytes(int64_t d_out, int64_t R, DType dt) const override {
    check_wtype(dt, "lora_b_bytes");
    return size_t(d_out) * size_t(R) * dtype_size(dt);
  }
  void prepare_lora_b(const float* B, int64_t d_out, int64_t R, DType dt, void* dst) override;

  // ---- ops
  size_t workspace_bytes(const ops::MatmulParams& p) const override;
  void matmul(const ops::MatmulParams& p, void* ws) override;
  void rmsnorm(const ops::RmsNormParams& p) override {
    bind();
    ATMOE_CUDA_LAUNCH(cuda::rmsnorm(p, stream_));
  }
  void rope(const ops::RopeParams& p) override {
    bind();
    ATMOE_CUDA_REQUIRE(p.D <= cuda::kRopeMaxD, "cuda rope: head dim {} > {}", p.D, cuda::kRopeMaxD);
    ATMOE_CUDA_LAUNCH(cuda::rope(p, stream_));
  }
  void silu_mul(const ops::SiluMulParams& p) override {
    bind();
    ATMOE_CUDA_LAUNCH(cuda::silu_mul(p, stream_));
  }
  size_t workspace_bytes(const ops::AttentionParams& p) const override;
  void attention(const ops::AttentionParams& p, void* ws) override;
  size_t workspace_bytes(const ops::LoraMixParams& p) const override;
  void lora_mix(const ops::LoraMixParams& p, void* ws) override;
  size_t workspace_bytes(const ops::TrexParams& p) const override { return cuda::trex_workspace_bytes(p); }
  void trex(const ops::TrexParams& p, void* ws) override;
  void softmax_rows(const ops::SoftmaxParams& p) override {
    bind();
    ATMOE_CUDA_LAUNCH(cuda::softmax_rows(p, stream_));
  }
  void sample_rows(const ops::SampleParams& p) override;

 private:
  struct Slot {
    void* host = nullptr;  // pinned
    size_t cap = 0;
    cudaEvent_t done = nullptr;  // recorded after the slot's last copy
    bool pending = false;
  };

  // A pinned staging slot of at least `bytes` whose earlier copies have completed.
  Slot& stage(size_t bytes);
  // Sends `bytes` of slot `s` to device `dst` on the stream and marks the slot busy.
  void stage_send(Slot& s, void* dst, size_t bytes);
  void release() noexcept;

  int dev_ = 0;
  cudaDeviceProp prop_{};
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_ws_ = nullptr;
  Slot slots_[kStageSlots];
  int next_slot_ = 0;
  void* dl_host_ = nullptr;  // pinned: logits rows and tokens of sample_rows
  size_t dl_cap_ = 0;
  // Reused host scratch (plans of lora_mix, sample_rows).
  std::vector<int32_t> cnt_, start_, fill_, ent_;
  std::vector<int64_t> rows_;
  std::vector<std::pair<float, int32_t>> sample_scratch_;
};

CudaBackend::CudaBackend(int device) : dev_(device) {
  std::string why;
  const int n = cuda::device_count(&why);
  if (n == 0) throw RuntimeError(fmt::format("cuda: no usable CUDA device ({})", why.empty() ? "none found" : why));
  if (device < 0 || device >= n)
    throw InputError(fmt::format("cuda: device {} does not exist ({} device{} found)", device, n, n == 1 ? "" : "s"));
  try {
    ATMOE_CUDA_CHECK(cudaSetDevice(device));
    ATMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop_, device));
    ATMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ATMOE_CUBLAS_CHECK(cublasCreate(&cublas_));
    ATMOE_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    // A workspace of our own: cuBLAS does not allocate inside an op (CONVENTIONS.md 4).
    ATMOE_CUDA_CHECK(cudaMalloc(&cublas_ws_, kCublasWorkspace));
    ATMOE_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_ws_, kCublasWorkspace));
    // No TF32: f32 GEMMs stay f32 (the op tests hold them to 1e-5).
    ATMOE_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
    for (Slot& s : slots_) ATMOE_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
  } catch (...) {
    release();
    throw;
  }
}

void CudaBackend::release() noexcept {
  if (stream_) cudaStreamSynchronize(stream_);
  for (Slot& s : slots_) {
    if (s.done) cudaEventDestroy(s.done);
    if (s.host) cudaFreeHost(s.host);
    s = Slot{};
  }
  if (dl_host_) cudaFreeHost(dl_host_);
  dl_host_ = nullptr;
  dl_cap_ = 0;
  if (cublas_) cublasDestroy(cublas_);
  cublas_ = nullptr;
  if (cublas_ws_) cudaFree(cublas_ws_);
  cublas_ws_ = nullptr;
  if (stream_) cudaStreamDestroy(stream_);
  stream_ = nullptr;
}

CudaBackend::Slot& CudaBackend::stage(size_t bytes) {
  Slot& s = slots_[next_slot_];
  next_slot_ = (next_slot_ + 1) % kStageSlots;
  if (s.pending) {
    ATMOE_CUDA_CHECK(cudaEventSynchronize(s.done));
    s.pending = false;
  }
  if (s.cap < bytes) {
    if (s.host) ATMOE_CUDA_CHECK(cudaFreeHost(s.host));
    s.host = nullptr;
    s.cap = 0;
    const size_t cap = std::max(kStageMinBytes, bytes + bytes / 2);
    ATMOE_CUDA_CHECK(cudaMallocHost(&s.host, cap));
    s.cap = cap;
  }
  return s;
}

void CudaBackend::stage_send(Slot& s, void* dst, size_t bytes) {
  ATMOE_CUDA_CHECK(cudaMemcpyAsync(dst, s.host, bytes, cudaMemcpyHostToDevice, stream_));
  ATMOE_CUDA_CHECK(cudaEventRecord(s.done, stream_));
  s.pending = true;
}

void* CudaBackend::alloc(size_t bytes) {
  bind();
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();  // an allocation failure is not sticky: clear it
    throw RuntimeError(fmt::format("cudaMalloc of {} bytes on cuda:{} failed: {} ({})", bytes, dev_,
                                   cudaGetErrorName(e), cudaGetErrorString(e)));
  }
  return p;
}

void CudaBackend::upload(void* dst, const void* host_src, size_t bytes) {
  bind();
  if (bytes == 0) return;
  if (bytes <= kStageUploadMax) {
    Slot& s = stage(bytes);
    std::memcpy(s.host, host_src, bytes);
    stage_send(s, dst, bytes);
    return;
  }
  ATMOE_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
  ATMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::download(void* host_dst, const void* src, size_t bytes) {
  bind();
  if (bytes == 0) return;
  ATMOE_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  ATMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// ---- weight preparation: host conversion, then one synchronous upload.

void CudaBackend::prepare_weight(const float* w, int64_t N, int64_t K, DType dt, void* dst) {
  bind();
  check_wtype(dt, "prepare_weight");
  ATMOE_CUDA_REQUIRE(N >= 0 && K >= 0, "cuda prepare_weight: bad shape [{}, {}]", N, K);
  const size_t n = size_t(N) * size_t(K);
  if (n == 0) return;
  if (dt == DType::F32) {
    ATMOE_CUDA_CHECK(cudaMemcpyAsync(dst, w, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
    ATMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return;
  }
  std::vector<uint16_t> tmp(n);
  f32_to_bf16_n(w, tmp.data(), n);
  ATMOE_CUDA_CHECK(cudaMemcpyAsync(dst, tmp.data(), n * sizeof(uint16_t), cudaMemcpyHostToDevice, stream_));
  ATMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));  // tmp dies here
}

void CudaBackend::prepare_lora_b(const float* B, int64_t d_out, int64_t R, DType dt, void* dst) {
  bind();
  check_wtype(dt, "prepare_lora_b");
  ATMOE_CUDA_REQUIRE(d_out >= 0 && R >= 0, "cuda prepare_lora_b: bad shape [{}, {}]", d_out, R);
  // Bᵀ [R, d_out]: a rank row contiguous over the outputs.
  const size_t n = size_t(d_out) * size_t(R), es = dtype_size(dt);
  if (n == 0) return;
  std::vector<uint8_t> tmp(n * es);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t o = 0; o < d_out; ++o) {
      const float v = B[o * R + r];
      const size_t at = size_t(r) * size_t(d_out) + size_t(o);
      if (dt == DType::F32)
        std::memcpy(tmp.data() + at * 4, &v, 4);
      else {
        const uint16_t h = f32_to_bf16(v);
        std::memcpy(tmp.data() + at * 2, &h, 2);
      }
    }
  ATMOE_CUDA_CHECK(cudaMemcpyAsync(dst, tmp.data(), tmp.size(), cudaMemcpyHostToDevice, stream_));
  ATMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// ---- matmul: gemv kernel for decode, cuBLAS above kGemvMaxTokens tokens.

size_t CudaBackend::workspace_bytes(const ops::MatmulParams& p) const {
  if (p.w_dtype == DType::BF16 && p.T > cuda::kGemvMaxTokens && p.N > 0 && p.K > 0)
    return (size_t(p.T) * size_t(p.K) * sizeof(uint16_t) + 255) / 256 * 256;  // x in bf16, [T, K]
  return 0;
}

void CudaBackend::matmul(const ops::MatmulParams& p, void* ws) {
  bind();
  if (p.T <= 0 || p.N <= 0) return;
  check_wtype(p.w_dtype, "matmul");
  if (p.K <= 0) {  // y = (accumulate ? y : 0) + bias
    ATMOE_CUDA_LAUNCH(cuda::add_bias_rows(p.bias, p.y, p.ldy, p.T, p.N, p.accumulate, stream_));
    return;
  }
  if (p.T <= cuda::kGemvMaxTokens) {
    ATMOE_CUDA_LAUNCH(cuda::matmul_gemv(p, stream_));
    return;
  }
  ATMOE_CUDA_REQUIRE(p.T <= INT_MAX && p.N <= INT_MAX && p.K <= INT_MAX && p.ldx <= INT_MAX && p.ldy <= INT_MAX &&
                         p.ldx >= p.K && p.ldy >= p.N,
                     "cuda matmul: shape T={} N={} K={} ldx={} ldy={} out of cuBLAS's range", p.T, p.N, p.K, p.ldx,
                     p.ldy);
  // Column-major view: y^T [N, T] (ld ldy) = W [N, K] (col-major [K, N], ld K, transposed)
  // · x^T [K, T] (ld ldx). Bias first (y = bias or y += bias), then beta = 1.
  const float alpha = 1.f;
  float beta = p.accumulate ? 1.f : 0.f;
  if (p.bias) {
    ATMOE_CUDA_LAUNCH(cuda::add_bias_rows(p.bias, p.y, p.ldy, p.T, p.N, p.accumulate, stream_));
    beta = 1.f;
  }
  const int N = int(p.N), T = int(p.T), K = int(p.K), ldx = int(p.ldx), ldy = int(p.ldy);
  if (p.w_dtype == DType::F32) {
    ATMOE_CUBLAS_CHECK(cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &alpha, static_cast<const float*>(p.w),
                                   K, p.x, ldx, &beta, p.y, ldy));
    return;
  }
  ATMOE_CUDA_REQUIRE(ws != nullptr, "cuda matmul: bf16 weights with T = {} need the workspace", p.T);
  ATMOE_CUDA_LAUNCH(cuda::f32_to_bf16_rows(p.x, p.ldx, p.T, p.K, ws, stream_));
  ATMOE_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &alpha, p.w, CUDA_R_16BF, K, ws,
                                  CUDA_R_16BF, K, &beta, p.y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
}

// ---- attention: the sequence table and the row table into the workspace, one kernel.

static int64_t attention_rows(const ops::AttentionParams& p) {
  int64_t n = 0;
  for (int64_t s = 0; s < p.n_seqs; ++s) n += std::max<int64_t>(p.seqs[s].T, 0);
  return n;
}

size_t CudaBackend::workspace_bytes(const ops::AttentionParams& p) const {
  return cuda::attention_workspace_bytes(p.n_seqs, attention_rows(p));
}

void CudaBackend::attention(const ops::AttentionParams& p, void* ws) {
  bind();
  const int64_t n_rows = attention_rows(p);
  if (n_rows == 0 || p.Hq <= 0) return;
  ATMOE_CUDA_REQUIRE(p.Hkv > 0 && p.Hq % p.Hkv == 0 && p.Hq <= 65535, "cuda attention: Hq = {}, Hkv = {}", p.Hq, p.Hkv);
  ATMOE_CUDA_REQUIRE(p.D > 0 && p.D <= cuda::kAttnMaxD, "cuda attention: head dim {} (supported: 1..{})", p.D,
                     cuda::kAttnMaxD);
  ATMOE_CUDA_REQUIRE(n_rows <= INT32_MAX && p.n_seqs <= INT32_MAX, "cuda attention: {} rows", n_rows);
  ATMOE_CUDA_REQUIRE(ws != nullptr, "cuda attention: no workspace");
  const size_t rows_off = cuda::attention_rows_offset(p.n_seqs);
  const size_t bytes = cuda::attention_workspace_bytes(p.n_seqs, n_rows);
  Slot& s = stage(bytes);
  size_t r = 0;
  for (int64_t i = 0; i < p.n_seqs; ++i) {
    const ops::AttentionSeq& q = p.seqs[i];
    cuda::AttnSeqDev d;
    d.k = q.k;
    d.v = q.v;
    d.pos = q.pos;
    d.t0 = q.t0;
    put(s.host, size_t(i) * sizeof(cuda::AttnSeqDev), d);
    for (int64_t t = 0; t < q.T; ++t, ++r) {
      cuda::AttnRowDev row;
      row.seq = int32_t(i);
      row.t = int32_t(t);
      put(s.host, rows_off + r * sizeof(cuda::AttnRowDev), row);
    }
  }
  stage_send(s, ws, bytes);
  const auto* seqs = static_cast<const cuda::AttnSeqDev*>(ws);
  const auto* rows = reinterpret_cast<const cuda::AttnRowDev*>(static_cast<const char*>(ws) + rows_off);
  ATMOE_CUDA_LAUNCH(cuda::attention(p, seqs, rows, n_rows, stream_));
}

// ---- lora_mix: work lists built on the host, one upload, shrink then expand.

static void lora_sizes(const ops::LoraMixParams& p, int64_t* ldu, int64_t* n_list) {
  *ldu = 0;
  *n_list = 0;
  for (int i = 0; i < p.n_sites; ++i) {
    *ldu += p.sites[i].R;
    for (int64_t b = 0; b < p.sites[i].n_blocks; ++b) *n_list += p.sites[i].blocks[b].n_toks;
  }
}

size_t CudaBackend::workspace_bytes(const ops::LoraMixParams& p) const {
  int64_t ldu, n_list;
  lora_sizes(p, &ldu, &n_list);
  if (p.T <= 0 || n_list == 0) return 0;
  return cuda::lora_layout(p.T, ldu, p.n_sites, n_list).end;
}

void CudaBackend::lora_mix(const ops::LoraMixParams& p, void* ws) {
  bind();
  if (p.T <= 0 || p.n_sites <= 0) return;
  int64_t ldu, n_list;
  lora_sizes(p, &ldu, &n_list);
  if (n_list == 0) return;
  check_wtype(p.dtype, "lora_mix");
  ATMOE_CUDA_REQUIRE(p.T <= INT32_MAX && n_list <= INT32_MAX && ldu <= INT32_MAX, "cuda lora_mix: T = {}, {} listings",
                     p.T, n_list);
  ATMOE_CUDA_REQUIRE(ws != nullptr, "cuda lora_mix: no workspace");
  const cuda::LoraLayout L = cuda::lora_layout(p.T, ldu, p.n_sites, n_list);
  const size_t bytes = L.end - L.sites_off;
  Slot& s = stage(bytes);
  void* img = s.host;  // the image of [sites_off, end)
  const size_t o_sites = 0, o_shrink = L.shrink_off - L.sites_off, o_expand = L.expand_off - L.sites_off,
               o_ranges = L.ranges_off - L.sites_off;
  int64_t n_shrink = 0, n_expand = 0, n_ranges = 0, max_d_out = 0, u_off = 0;
  bool vec = p.d_in % 8 == 0 && p.ldx % 4 == 0 && aligned16(p.x);
  const int64_t T = p.T;
  for (int si = 0; si < p.n_sites; ++si) {
    const ops::LoraSite& site = p.sites[si];
    cuda::LoraSiteDev d;
    d.row_col = site.row_col;
    d.row_scale = site.row_scale;
    d.y = site.y;
    d.ldy = site.ldy;
    d.R = site.R;
    d.d_out = site.d_out;
    d.u_off = u_off;
    put(img, o_sites + size_t(si) * sizeof(cuda::LoraSiteDev), d);
    u_off += site.R;
    // Shrink items, and per token the list of its blocks (counting sort by token; blocks
    // stay in ascending order inside a token).
    cnt_.assign(size_t(T), 0);
    int64_t prev_end = 0, site_list = 0;
    for (int64_t b = 0; b < site.n_blocks; ++b) {
      const ops::LoraBlock& blk = site.blocks[b];
      ATMOE_CUDA_REQUIRE(blk.r0 >= prev_end && blk.r0 <= blk.r1 && blk.r1 <= site.R,
                         "cuda lora_mix: site {} block {} rows [{}, {}) (previous end {}, R = {})", si, b, blk.r0,
                         blk.r1, prev_end, site.R);
      prev_end = blk.r1;
      if (blk.n_toks <= 0 || blk.r0 == blk.r1) continue;
      ATMOE_CUDA_REQUIRE(blk.A != nullptr && blk.B != nullptr, "cuda lora_mix: site {} block {} has no weights", si,
                         b);
      if (!aligned16(blk.A)) vec = false;
      for (int64_t j = 0; j < blk.n_toks; ++j) {
        const int32_t t = blk.toks[j];
        ATMOE_CUDA_REQUIRE(t >= 0 && t < T, "cuda lora_mix: site {} block {} token {} of T = {}", si, b, t, T);
        put(img, o_shrink + size_t(n_shrink++) * sizeof(cuda::LoraShrinkItem),
            cuda::LoraShrinkItem{blk.A, int32_t(si), t, int32_t(blk.r0), int32_t(blk.r1)});
        ++cnt_[size_t(t)];
        ++site_list;
      }
    }
    if (site_list == 0) continue;
    max_d_out = std::max(max_d_out, site.d_out);
    start_.assign(size_t(T) + 1, 0);
    for (int64_t t = 0; t < T; ++t) start_[size_t(t) + 1] = start_[size_t(t)] + cnt_[size_t(t)];
    fill_.assign(start_.begin(), start_.end() - 1);
    ent_.resize(size_t(site_list));
    for (int64_t b = 0; b < site.n_blocks; ++b) {
      const ops::LoraBlock& blk = site.blocks[b];
      if (blk.n_toks <= 0 || blk.r0 == blk.r1) continue;
      for (int64_t j = 0; j < blk.n_toks; ++j) ent_[size_t(fill_[size_t(blk.toks[j])]++)] = int32_t(b);
    }
    // Expand items: one per token of the site, its blocks as ranges (each with its B_b).
    for (int64_t t = 0; t < T; ++t) {
      if (cnt_[size_t(t)] == 0) continue;
      const int64_t range0 = n_ranges;
      for (int32_t e = start_[size_t(t)]; e < start_[size_t(t) + 1]; ++e) {
        const ops::LoraBlock& blk = site.blocks[ent_[size_t(e)]];
        put(img, o_ranges + size_t(n_ranges++) * sizeof(cuda::LoraRangeDev),
            cuda::LoraRangeDev{blk.B, int32_t(blk.r0), int32_t(blk.r1)});
      }
      put(img, o_expand + size_t(n_expand++) * sizeof(cuda::LoraExpandItem),
          cuda::LoraExpandItem{int32_t(si), int32_t(t), int32_t(range0), int32_t(n_ranges - range0)});
    }
  }
  if (n_shrink == 0) return;  // the slot was not sent: nothing is pending on it
  char* base = static_cast<char*>(ws);
  stage_send(s, base + L.sites_off, bytes);
  cuda::LoraMixDev a;
  a.x = p.x;
  a.ldx = p.ldx;
  a.d_in = p.d_in;
  a.coef = p.coef;
  a.ldc = p.ldc;
  a.u = reinterpret_cast<float*>(base);
  a.ldu = ldu;
  a.sites = reinterpret_cast<const cuda::LoraSiteDev*>(base + L.sites_off);
  a.shrink = reinterpret_cast<const cuda::LoraShrinkItem*>(base + L.shrink_off);
  a.n_shrink = n_shrink;
  a.expand = reinterpret_cast<const cuda::LoraExpandItem*>(base + L.expand_off);
  a.n_expand = n_expand;
  a.ranges = reinterpret_cast<const cuda::LoraRangeDev*>(base + L.ranges_off);
  a.max_d_out = max_d_out;
  a.dtype = p.dtype;
  a.vec = vec;
  ATMOE_CUDA_LAUNCH(cuda::lora_mix(a, stream_));
}

// ---- trex

void CudaBackend::trex(const ops::TrexParams& p, void* ws) {
  bind();
  if (p.T <= 0) return;
  check_wtype(p.dtype, "trex");
  ATMOE_CUDA_REQUIRE(p.R >= p.r1 + p.E && (!p.diagonal || (p.r1 == p.E && p.r2 == p.E)),
                     "cuda trex: R = {}, r1 = {}, r2 = {}, E = {}, diagonal = {}", p.R, p.r1, p.r2, p.E, p.diagonal);
  ATMOE_CUDA_REQUIRE(p.omega != nullptr, "cuda trex: omega is required");
  ATMOE_CUDA_REQUIRE(ws != nullptr, "cuda trex: no workspace");
  ATMOE_CUDA_LAUNCH(cuda::trex(p, ws, stream_));
}

// ---- sample_rows: argmax on the device for every row; sampled rows on the host.

void CudaBackend::sample_rows(const ops::SampleParams& p) {
  bind();
  if (p.R <= 0) return;
  ATMOE_CUDA_REQUIRE(p.V > 0 && p.out != nullptr, "cuda sample_rows: V = {}", p.V);
  ATMOE_CUDA_LAUNCH(cuda::argmax_rows(p.logits, p.ld, p.R, p.V, p.out, stream_));
  if (!p.temperature) return;
  rows_.clear();
  for (int64_t r = 0; r < p.R; ++r) {
    const bool greedy = !(p.temperature[r] >= 1e-5f) || (p.top_k && p.top_k[r] == 1);  // as cpu::sample
    if (!greedy) rows_.push_back(r);
  }
  if (rows_.empty()) return;
  ATMOE_CUDA_REQUIRE(p.u != nullptr, "cuda sample_rows: sampled rows need their draws u");
  // Pinned download area: the sampled rows' logits, then out[R].
  const size_t logits_bytes = rows_.size() * size_t(p.V) * sizeof(float);
  const size_t need = logits_bytes + size_t(p.R) * sizeof(int32_t);
  if (dl_cap_ < need) {
    if (dl_host_) ATMOE_CUDA_CHECK(cudaFreeHost(dl_host_));  // nothing in flight: every use ends synchronised
    dl_host_ = nullptr;
    dl_cap_ = 0;
    ATMOE_CUDA_CHECK(cudaMallocHost(&dl_host_, need));
    dl_cap_ = need;
  }
  auto* lg = static_cast<float*>(dl_host_);
  auto* tok = reinterpret_cast<int32_t*>(static_cast<char*>(dl_host_) + logits_bytes);
  for (size_t i = 0; i < rows_.size(); ++i)
    ATMOE_CUDA_CHECK(cudaMemcpyAsync(lg + i * size_t(p.V), p.logits + rows_[i] * p.ld, size_t(p.V) * sizeof(float),
                                     cudaMemcpyDeviceToHost, stream_));
  ATMOE_CUDA_CHECK(cudaMemcpyAsync(tok, p.out, size_t(p.R) * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
  ATMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (size_t i = 0; i < rows_.size(); ++i) {
    const int64_t r = rows_[i];
    tok[r] = cpu::sample_with_u(lg + i * size_t(p.V), p.V, p.temperature[r], p.top_k ? p.top_k[r] : 0,
                                p.top_p ? p.top_p[r] : 1.f, p.min_p ? p.min_p[r] : 0.f, p.u[r], sample_scratch_);
  }
  upload(p.out, tok, size_t(p.R) * sizeof(int32_t));
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) {
  return std::make_unique<CudaBackend>(device);
}

}  // namespace atmoe
