// T-REX / Intuition-MoR1E rank-1 experts (DESIGN.md 1.2) on the device; the CPU twin
// kernels/cpu/trex.h (trex_apply_ref) is the specification (ops::TrexParams).
// Prepared weights (CudaBackend::prepare_weight): AW row-major [R, d_in] (rows 0..r1-1 = A,
// r1..r1+E-1 = W_r), B row-major [d_out, r2], both F32 or BF16.
// Three kernels, token j of the call reading/writing row rows[j] (or j) of x and y:
//   shrink: uw[j, r] = AW[r, :] · x[row_j]  for r < r1 + E   (one warp per (j, r))
//   mix:    g = c_p·ω'_j·softmax(uw[j, r1:r1+E]) + c_s·(1 − ω'_j)·s[j]  (in place over the
//           logits); v[j, :] = gate · Gᵀ u (G = reshape(g, r1 × r2), or diag(g) in rank1
//           mode)                                              (one block per token)
//   expand: y[row_j, n] += Σ_i B[n, i] · v[j, i]            (one thread per (j, n))
// Workspace layout (trex_workspace_bytes):
//   uw f32 [T, R] @ 0;  v f32 [T, r2] @ align256(T·R·4).
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe::cuda {

inline size_t trex_v_offset(const ops::TrexParams& p) {
  return (size_t(p.T) * size_t(p.R) * 4 + 255) / 256 * 256;
}
inline size_t trex_workspace_bytes(const ops::TrexParams& p) {
  return p.T <= 0 ? 0 : trex_v_offset(p) + size_t(p.T) * size_t(p.r2) * 4;
}

// Requires R >= r1 + E, omega != nullptr, diagonal => r1 == r2 == E (checked by the
// backend). Returns the first launch error as int (0 = success).
int trex(const ops::TrexParams& p, void* ws, void* stream);

}  // namespace atmoe::cuda
