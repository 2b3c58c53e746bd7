// Batched LoRA mixture on one *site input* (DESIGN.md 1.3): shrink -> mix -> expand for
// every site fed by the same activations (q,k,v read attn_in; gate,up read mlp_in), SGMV-
// style: one parallel region for a whole batch whose tokens use different mixes.
//   x:    [T, d_in] (stride ldx), shared by the sites
//   coef: [T, ldc]: the routing coefficient of each column (expert) for each token
//   per site s:
//     A_s [R_s, d_in]: the stacked lora_A, row-major (a rank row contiguous), f32 or bf16
//     B_s [d_out_s, R_s]: the stacked lora_B, same dtype, stored block by block: block
//       [r0, r1) is a packed-panel matrix (matmul.h) [d_out_s, r1 - r0] of its own at
//       element lora_block_offset(d_out_s, r0), so that one block's rows (one expert group's
//       delta) are one contiguous run of memory (lora_b_index gives an element's place)
//     row_col_s [R_s] (column of coef; -1 = padding), row_scale_s [R_s] (LoRA scale s_e)
//     blocks_s: [r0, r1) row ranges (any boundaries, ascending, disjoint) with the tokens
//       that use them; rows outside every block and tokens not listed cost nothing
//     y_s: [T, d_out_s] (stride ldy_s), y_s += Δ_s
//   u (workspace): [T, Σ_s R_s], site s at column offset Σ_{s' < s} R_s'
// Δ_s[t] = Σ_{blocks b ∋ t} Σ_{r in b} B_s[:, r] · coef[t, col(r)] · scale(r) · (A_s[r, :] · x[t])
// Blocks are not padded and A is row-major, so a step reads exactly the rank rows of the
// blocks its tokens use (memory and bytes read follow the adapters' bytes). The shrink of a
// block with few tokens is dot products (a row read once per four tokens); with kLoraPackMinTokens or more,
// its rows are first packed into a 32-row panel in the thread's workspace and run through
// the GEMM panel kernel. The expand of a token reads only the rank columns of its blocks.
// One parallel region (or the calling thread alone below kLoraInlineMacs): shrink+mix over
// (site, block, 32 rows) items, a barrier, expand over (site, output-panel chunk) items;
// items are claimed from shared counters.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "kernels/cpu/matmul.h"
#include "kernels/ops.h"

namespace atmoe {
class ThreadPool;
}

namespace atmoe::cpu {

using LoraBlock = ops::LoraBlock;
using LoraSite = ops::LoraSite;

// Where block [r0, r1)'s packed B starts in B_s, and where B_s[n][r] (r0 <= r < r1) lies.
inline int64_t lora_block_offset(int64_t d_out, int64_t r0) { return packed_rows(d_out) * r0; }
inline int64_t lora_b_index(int64_t d_out, int64_t r0, int64_t r1, int64_t n, int64_t r) {
  return lora_block_offset(d_out, r0) + ((n / kPanel) * (r1 - r0) + (r - r0)) * kPanel + n % kPanel;
}

// Work lists of one call, rebuilt each time; kept by the caller so calls do not allocate.
constexpr int64_t kLoraPackMinTokens = 8;
// Below this many multiply-adds a call runs on the calling thread alone. Decode calls
// (one token through one rank-8 expert: ~5e4 MACs, ~40 kB) go parallel: their reads are
// short runs that wait on DRAM latency, and two threads keep twice as many misses in
// flight; measured 2.1-2.4 -> 1.1-1.5 ms per SmolLM2 step (docs/performance.md).
constexpr int64_t kLoraInlineMacs = int64_t(1) << 12;

struct LoraPlan {
  struct Shrink {
    int32_t site;
    int64_t block, r0, r1;  // rows [r0, r1) of the block (at most 32)
  };
  struct Expand {
    int32_t site;
    int64_t range0, range1, tok0, tok1;  // k ranges [range0, range1) of `ranges`, tokens of `toks`
  };
  std::vector<Shrink> shrink;
  std::vector<Expand> expand;
  std::vector<int32_t> toks;
  std::vector<int64_t> ranges;    // [begin, end) pairs (one per block: their B matrices are apart)
  std::vector<const void*> range_w;  // the packed B of each range's block
  std::vector<uint8_t> panel_ws;  // per thread: one packed 32-row panel of A [d_in][32]
};

// ops::LoraMixParams (A: row-major [R, d_in]; B: lora_prepare_b's block layout) plus
// the CPU workspace: u and the work lists.
struct LoraMixParams : ops::LoraMixParams {
  float* u = nullptr;  // [T, Σ R_s]
  LoraPlan* plan = nullptr;

  LoraMixParams() = default;
  LoraMixParams(const ops::LoraMixParams& o) : ops::LoraMixParams(o) {}  // NOLINT: implicit on purpose
};

// B row-major [d_out, R] f32 -> the block layout above (each [r0, r1) of `bounds` a packed
// matrix of its own at lora_block_offset(d_out, r0)), in dt.
void lora_prepare_b(const float* B, int64_t d_out, int64_t R, const int64_t* bounds, int64_t n_blocks, DType dt,
                    void* out);

// Floats of u for these sites and T tokens (the plan holds the rest of the workspace).
int64_t lora_workspace_floats(const LoraMixParams& p);
void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool);
void lora_mix_apply_ref(const LoraMixParams& p);  // float64, single-threaded, no workspace

}  // namespace atmoe::cpu
