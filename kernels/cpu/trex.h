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

namespace atmoe { class ThreadPool; }

namespace atmoe::cpu {

constexpr double kTrexTokenCoef = 32.0;  // c_p in the released code
constexpr double kTrexTaskCoef = 4.0;    // c_s

struct TrexParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const void* AW = nullptr;  // packed [R, d_in]: rows 0..r1-1 = A, rows r1..r1+E-1 = W_r, R >= r1+E
  const void* B = nullptr;   // packed [d_out, r2]
  DType dtype = DType::F32;
  int64_t R = 0;             // rows of AW incl. padding
  int64_t T = 0, d_in = 0, d_out = 0, r1 = 0, r2 = 0, E = 0;
  bool diagonal = false;        // rank1 mode
  const int32_t* rows = nullptr;  // optional: token j of this call is row rows[j] of x and y
  const float* s = nullptr;     // [T, E]: the intuition term s of each token (nullptr = 0)
  const float* omega = nullptr; // [T]: ω' = σ(100 ω) of each token, in [0, 1]
  float gate = 1.f;             // σ(100 γ)
  float* ws = nullptr;       // trex_workspace_floats
  float* y = nullptr;
  int64_t ldy = 0;
};

int64_t trex_workspace_floats(const TrexParams& p);
void trex_apply(const TrexParams& p, ThreadPool& pool);
void trex_apply_ref(const TrexParams& p);  // float64, single-threaded

}  // namespace atmoe::cpu
