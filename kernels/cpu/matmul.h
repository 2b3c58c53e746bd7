// Linear layer: y[T, N] = x[T, K] · W[N, K]^T (+ bias[N]) (+ y when accumulate).
//   x: f32 row-major, stride ldx (>= K); y: f32, stride ldy (>= N).
//   W: f32 or bf16 in the *packed panel layout* (pack_weights): rows in panels of
//      kPanel = 32; panel p holds W[32p + j][k] at element (p * K + k) * 32 + j, i.e.
//      each panel is W^T restricted to 32 output rows ([K][32]); rows past N are zero.
//      A k-step of the micro-kernel reads 32 contiguous weights and broadcasts one x.
// Paths: the hand-written SIMD kernel (AVX-512 or AVX2, chosen at run time) streams the
// weights once and accumulates TB tokens × 32 outputs in registers, f32. With
// ATMOE_PREFILL_GEMM=blas, T >= kBlasMinTokens runs OpenBLAS sgemm instead, on row-major
// f32 panels unpacked into the workspace. The SIMD kernel is the default for prefill
// too: measured faster than OpenBLAS 0.3.21 here (docs/performance.md).
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "kernels/ops.h"

namespace atmoe {
class ThreadPool;
}

namespace atmoe::cpu {

constexpr int64_t kPanel = 32;
constexpr int64_t kBlasMinTokens = 32;

inline int64_t packed_rows(int64_t N) { return (N + kPanel - 1) / kPanel * kPanel; }
inline size_t packed_elems(int64_t N, int64_t K) { return size_t(packed_rows(N) * K); }
// w: row-major [N, K] f32 -> out: packed (f32 or bf16, round-to-nearest-even).
void pack_weights(const float* w, int64_t N, int64_t K, DType dt, void* out);
// Element W[n][k] of a packed matrix.
float packed_at(const void* w, DType dt, int64_t K, int64_t n, int64_t k);

// ops::MatmulParams (w: packed panels, the CPU backend's prepared layout) and the CPU-only
// extensions the LoRA expand uses.
struct MatmulParams : ops::MatmulParams {
  // Optional: sum over these [begin, end) ranges of k only (the LoRA expand over the
  // active experts' rank rows). SIMD path and reference only.
  const int64_t* k_ranges = nullptr;
  int64_t n_k_ranges = 0;
  // Optional, with k_ranges: range i's weights are a packed matrix of their own,
  // [N, k1 - k0] at k_range_w[i] (x is still read at columns k0..k1-1): the LoRA expand,
  // each block's B_b a packed matrix of its own (lora.h).
  const void* const* k_range_w = nullptr;
  // Optional gather/scatter (SIMD path and reference): token j reads x row x_rows[j] and
  // writes y row y_rows[j] (LoRA groups computed for the tokens that use them only).
  const int32_t* x_rows = nullptr;
  const int32_t* y_rows = nullptr;

  MatmulParams() = default;
  MatmulParams(const ops::MatmulParams& o) : ops::MatmulParams(o) {}  // NOLINT: implicit on purpose
};

inline int64_t x_row(const MatmulParams& p, int64_t t) { return p.x_rows ? p.x_rows[t] : t; }
// W[n][k] for k in range ri = [k0, k1) (reference paths).
float range_w_at(const MatmulParams& p, int64_t ri, int64_t k0, int64_t k1, int64_t n, int64_t k);
inline int64_t y_row(const MatmulParams& p, int64_t t) { return p.y_rows ? p.y_rows[t] : t; }

// Decode (up to 3 tokens): a base GEMV is bound by the misses it keeps in flight. Where
// gemv_prefetch() (cpu_features.h) says so, the panel kernels prefetch the k-row kGemvAhead
// steps after k_rel of panels [0, np) from `base` (each panel `stride` elements; a line a row
// for bf16, two for f32), so that the streams run at full speed from their start and after
// whatever read came between two GEMMs (docs/performance.md). The caller keeps k_rel +
// kGemvAhead inside the panel.
constexpr int64_t kGemvAhead = 16;
template <bool BF16>
inline void prefetch_gemv_rows(const void* w, size_t base, size_t stride, int64_t k_rel, int np) {
  constexpr size_t es = BF16 ? 2 : 4;
  for (int q = 0; q < np; ++q) {
    const char* a =
        static_cast<const char*>(w) + (base + size_t(q) * stride + size_t(k_rel + kGemvAhead) * kPanel) * es;
    __builtin_prefetch(a, 0, 3);
    if constexpr (!BF16) __builtin_prefetch(a + 64, 0, 3);
  }
}

// True when matmul() sends T-token calls to OpenBLAS (ATMOE_PREFILL_GEMM=blas).
bool use_blas(int64_t T);
// Workspace floats the BLAS path needs (row-major f32 panels); 0 on the SIMD path.
int64_t matmul_workspace_floats(const MatmulParams& p);
// `ws` must hold matmul_workspace_floats floats.
void matmul(const MatmulParams& p, float* ws, ThreadPool& pool);
// Always the SIMD panel kernel (no workspace), whatever T is.
void matmul_simd(const MatmulParams& p, ThreadPool& pool);
// The SIMD panel kernel on the listed output panels only ([p0, p1) pairs of panel indices).
void matmul_panels(const MatmulParams& p, const std::vector<std::pair<int64_t, int64_t>>& panels, ThreadPool& pool);
// The specification: plain loops, double accumulation. Single-threaded.
void matmul_ref(const MatmulParams& p);

// Panel kernels (internal; one per ISA): output rows of panels [p0, p1) for all T tokens.
void gemm_panels_scalar(const MatmulParams& p, int64_t p0, int64_t p1);
void gemm_panels_avx2(const MatmulParams& p, int64_t p0, int64_t p1);
void gemm_panels_avx512(const MatmulParams& p, int64_t p0, int64_t p1);
using PanelKernel = void (*)(const MatmulParams&, int64_t, int64_t);
PanelKernel panel_kernel();  // the best one for this CPU

}  // namespace atmoe::cpu
