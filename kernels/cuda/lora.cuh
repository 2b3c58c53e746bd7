// Batched LoRA mixture (SGMV-style, DESIGN.md 1.3) on the device; the CPU twin
// kernels/cpu/lora.h (lora_mix_apply_ref) is the specification (ops::LoraMixParams):
//   Δ_s[t] = Σ_{blocks b ∋ t} Σ_{r in b} B_b[:, r − r0] · coef[t, col(r)] · scale(r) · (A_b[r − r0, :] · x[t]).
//
// Layouts on the device (each block's weights where its LoraBlock says, ops.h):
//   A_b: [r1 − r0, d_in] row-major in dtype (the same on every backend: not prepared);
//   B_b: prepared by CudaBackend::prepare_lora_b as B_bᵀ, row-major [r1 − r0, d_out_s] in
//        dtype: rank row r is contiguous over the outputs, and the expand reads it coalesced
//        (thread per output n).
//
// Work lists: the backend flattens the host descriptors into device tables in the op's
// workspace (one upload per call):
//   shrink items: one per (site, block, listed token): u[t, u_off_s + r] =
//       (A_b[r − r0, :] · x[t]) · coef[t, row_col[r]] · row_scale[r] for r in [r0, r1)
//       (row_col < 0: 0). One block of 4 warps per item, one warp per rank row.
//   expand items: one per (site, token listed in any of its blocks), with the token's blocks
//       as ranges (ascending): y_s[t, n] += Σ_{ranges} Σ_r B_bᵀ[r − r0, n] · u[t, u_off_s + r].
//       Each (site, token, n) has one thread: no atomics, and a token in several blocks of a
//       site is summed in one place.
//
// Workspace layout (lora_layout; n_list = Σ_s Σ_b n_toks bounds every list):
//   u       f32 [T, ldu], ldu = Σ_s R_s, site s at column u_off_s = Σ_{s'<s} R_s'    @ 0
//   sites   LoraSiteDev[n_sites]                                                   @ sites_off
//   shrink  LoraShrinkItem[<= n_list]                                              @ shrink_off
//   expand  LoraExpandItem[<= n_list]                                              @ expand_off
//   ranges  LoraRangeDev[<= n_list]                                                @ ranges_off
// Every offset is a multiple of 256 bytes; [sites_off, end) is what the backend uploads.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "kernels/ops.h"

namespace atmoe::cuda {

struct LoraSiteDev {
  const int32_t* row_col = nullptr;
  const float* row_scale = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t R = 0, d_out = 0;
  int64_t u_off = 0;  // column of u where this site's rank rows start
};

struct LoraShrinkItem {
  const void* A;  // A_b of the item's block (row r0)
  int32_t site, tok, r0, r1;
};

// One block of a token's expand: rows [r0, r1) of the site, B_bᵀ at Bt.
struct LoraRangeDev {
  const void* Bt;
  int32_t r0, r1;
};

struct LoraExpandItem {
  int32_t site, tok;
  int32_t range0, n_ranges;  // ranges[range0 + i], i < n_ranges
};

struct LoraLayout {
  size_t sites_off = 0, shrink_off = 0, expand_off = 0, ranges_off = 0, end = 0;
};

inline size_t lora_align256(size_t b) {
  return (b + 255) / 256 * 256;
}
inline LoraLayout lora_layout(int64_t T, int64_t ldu, int64_t n_sites, int64_t n_list) {
  LoraLayout l;
  l.sites_off = lora_align256(size_t(T) * size_t(ldu) * sizeof(float));
  l.shrink_off = l.sites_off + lora_align256(size_t(n_sites) * sizeof(LoraSiteDev));
  l.expand_off = l.shrink_off + lora_align256(size_t(n_list) * sizeof(LoraShrinkItem));
  l.ranges_off = l.expand_off + lora_align256(size_t(n_list) * sizeof(LoraExpandItem));
  l.end = l.ranges_off + size_t(n_list) * sizeof(LoraRangeDev);
  return l;
}

// Kernel arguments: the op's activations plus the device tables (in the workspace).
struct LoraMixDev {
  const float* x = nullptr;
  int64_t ldx = 0, d_in = 0;
  const float* coef = nullptr;
  int64_t ldc = 0;
  float* u = nullptr;
  int64_t ldu = 0;
  const LoraSiteDev* sites = nullptr;
  const LoraShrinkItem* shrink = nullptr;
  int64_t n_shrink = 0;
  const LoraExpandItem* expand = nullptr;
  int64_t n_expand = 0;
  const LoraRangeDev* ranges = nullptr;
  int64_t max_d_out = 0;  // over the sites with expand items
  DType dtype = DType::F32;
  bool vec = false;  // d_in % 8 == 0, ldx % 4 == 0, x and every A 16-byte aligned
};

// The shrink, then the expand, on `stream`. Returns the first launch error as int (0 = success).
int lora_mix(const LoraMixDev& a, void* stream);

}  // namespace atmoe::cuda
