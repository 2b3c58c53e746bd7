// T-REX / Intuition-MoR1E rank-1 experts on one adapted module (DESIGN.md 1.2), for a
// batch of tokens whose sequences have different intuitions:
//   u  = A x                                   A: [r1, d_in]
//   p  = softmax(W_r x)                        W_r: [E, d_in], E = r1·r2
//   g  = c_p·ω'·p + c_s·(1 − ω')·s_t           s_t: [E], the intuition of token t's sequence
//   G  = reshape(g, r1 × r2)                   (rank1: E = r1 = r2 and G = diag(g))
//   Δy = σ(100γ) · B (Gᵀ u)                    B: [d_out, r2]
// Shrink: one GEMM with A and W_r stacked ([r1 + E, d_in], packed panels, rows padded);
// mix: the per-token r1 × r2 block (or diagonal); expand: one GEMM with B (accumulates).
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "kernels/ops.h"

namespace atmoe { class ThreadPool; }

namespace atmoe::cpu {

using ops::kTrexTaskCoef;
using ops::kTrexTokenCoef;

// ops::TrexParams (AW, B: packed panels) plus the workspace.
struct TrexParams : ops::TrexParams {
  float* ws = nullptr;  // trex_workspace_floats

  TrexParams() = default;
  TrexParams(const ops::TrexParams& o) : ops::TrexParams(o) {}  // NOLINT: implicit on purpose
};

int64_t trex_workspace_floats(const TrexParams& p);
void trex_apply(const TrexParams& p, ThreadPool& pool);
void trex_apply_ref(const TrexParams& p);  // float64, single-threaded

}  // namespace atmoe::cpu
