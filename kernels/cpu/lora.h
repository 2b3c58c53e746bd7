// Batched LoRA mixture on one *site input* (DESIGN.md 1.3): shrink -> mix -> expand for
// every site fed by the same activations (q,k,v read attn_in; gate,up read mlp_in), SGMV-
// style: one parallel region for a whole batch whose tokens use different mixes.
//   x:    [T, d_in] (stride ldx), shared by the sites
//   coef: [T, ldc]: the routing coefficient of each column (expert) for each token
//   per site s:
//     row_col_s [R_s] (column of coef; -1 = padding), row_scale_s [R_s] (LoRA scale s_e)
//     blocks_s: [r0, r1) row ranges (any boundaries, ascending, disjoint) with the tokens
//       that use them; rows outside every block and tokens not listed cost nothing. Each
//       block's weights are where it says (ops.h):
//       A_b [r1 - r0, d_in]: its lora_A rows, row-major (a rank row contiguous), f32 or bf16
//       B_b [d_out_s, r1 - r0]: its lora_B, same dtype, a packed-panel matrix (matmul.h)
//     y_s: [T, d_out_s] (stride ldy_s), y_s += Δ_s
//   u (workspace): [T, Σ_s R_s], site s at column offset Σ_{s' < s} R_s'
// Δ_s[t] = Σ_{blocks b ∋ t} Σ_{r in b} B_b[:, r − r0] · coef[t, col(r)] · scale(r)
//          · (A_b[r − r0, :] · x[t])
// Blocks are not padded, so a step reads exactly the rank rows of the blocks its tokens use
// (memory and bytes read follow the adapters' bytes). The shrink of a block with few tokens
// (decode) is lora_dots (one kernel per ISA: several rows and tokens a tile); with
// kLoraPackMinTokens or more, its rows are first packed into a 32-row panel in the thread's
// workspace and run through the GEMM panel kernel. The expand of a token reads only the
// rank columns of its blocks (the GEMM panel kernel with one k range per block).
// Calls whose blocks all have few tokens (decode batches), or below kLoraDecodeMacs, run in
// units: a site and the blocks that share its tokens (the groups a batch's tokens use); a
// thread takes whole units and computes shrink and expand with no barrier (the kernels
// prefetch the rank rows a few lines ahead of their loads). Larger ones: one parallel
// region, shrink+mix over (site, block, 32 rows) items, a barrier, expand over (site,
// output-panel chunk) items; items are claimed from shared counters.
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

// A block with this many tokens or more packs its rows into a panel for the shrink (above).
constexpr int64_t kLoraPackMinTokens = 8;
// Below this many multiply-adds a call is decode-sized (one token through one rank-8 expert
// on q, k, v: ~2e4 MACs, ~40 kB): its time is the rank rows' DRAM latency, not arithmetic.
// Such calls, and calls whose blocks all have fewer than kLoraPackMinTokens tokens, run in
// units (below): units on threads with no barrier, the kernels prefetching ahead;
// measured per SmolLM2 decode step in docs/performance.md.
constexpr int64_t kLoraDecodeMacs = int64_t(1) << 17;

// Calls of at most this many multiply-adds (one token through a group of one rank-8 expert
// on a site input: 1e4-3.4e4 for SmolLM2) run beside the base GEMM when the caller asks
// (Backend::lora_mix_beside): one thread reads their rank rows while the others stream the
// GEMM's weights. Measured per decode step (docs/performance.md): one token, a gain; two
// tokens in two groups, even; four in four groups and batch 16, a loss (one thread then
// computes more than it saves).
constexpr int64_t kLoraBesideMacs = int64_t(1) << 16;
// The multiply-adds of a call: Σ over blocks of rows × tokens × (d_in + d_out).
int64_t lora_mix_macs(const ops::LoraMixParams& p);

// The work lists of one call structure (the sites' ranks, widths and blocks, the tokens of
// each block), built once and reused while the structure repeats (lora_mix_apply).
struct LoraWork {
  std::vector<int64_t> key;  // the structure these lists were built for (empty: none)
  struct Shrink {
    int32_t site;
    int64_t block, r0, r1;  // rows [r0, r1) of the block (at most 32)
  };
  struct Expand {
    int32_t site;
    int64_t range0, range1, tok0, tok1;  // k ranges [range0, range1) of `ranges`, tokens of `toks`
    int64_t block0;                      // the site's block of the first range
  };
  std::vector<Shrink> shrink;
  std::vector<Expand> expand;
  std::vector<int32_t> toks;
  // Expand k ranges: [begin, end) pairs, one per block (their B matrices are apart); the
  // (site, block) of each; its packed B (read again every call).
  std::vector<int64_t> ranges;
  std::vector<std::pair<int32_t, int64_t>> range_block;
  std::vector<const void*> range_w;
  struct Chunk {  // expand work: a site's output panels [p0, p1), its calls
    int32_t site;
    int64_t p0, p1, call0, call1;
  };
  std::vector<Chunk> chunks;
  std::vector<int64_t> u_off;        // u column offset of each site
  int64_t ldu = 0;                   // Σ R_s
  bool units = false;                // decode-sized: runs in units
  std::vector<int64_t> site_expand;  // [n_sites + 1]: each site's calls in expand
  // Units of a few-token call: (site, set of blocks that share tokens). Units write disjoint
  // u and y entries, so threads take whole units with no barrier. CSR lists per unit of its
  // shrink items and expand calls.
  std::vector<int32_t> unit_site, parent, tok_owner;
  std::vector<int64_t> site_block0, block_unit, cursor;
  std::vector<int64_t> unit_shrink_off, unit_shrink, unit_expand_off, unit_expand;
};

// The work lists of the last kSlots call structures, and the per-thread workspace. A decode
// step calls the same few structures in every layer (one per site input, while the routing
// keeps each token's groups): after the first layer a call compares its structure with the
// slots' and reads only its blocks' weight pointers again. kSlots covers a layer's calls
// through one backend several times over (4 site inputs; a run-time adapter in the same
// process adds its own 4), so a step's cycle of structures stays cached.
struct LoraPlan {
  static constexpr int kSlots = 16;
  LoraWork slot[kSlots];
  uint64_t hash[kSlots] = {};      // of each slot's key, together: a miss reads one line
  int next = 0;                    // the slot a new structure takes (round robin)
  int at = 0;                      // the last call's slot: a step's cycle of structures
                                   // fills the slots in order, so the search starts after it
  const LoraWork* last = nullptr;  // the last call's lists (tests)
  int64_t hits = 0, misses = 0;    // calls that found their structure, calls that built it
  std::vector<int64_t> key;        // this call's structure
  std::vector<uint8_t> panel_ws;   // per thread: one packed 32-row panel of A [d_in][32]
};

// The shrink of a block with few tokens (fewer than kLoraPackMinTokens; decode):
// u[toks[j] · ldu + i] = A[i, :] · x[toks[j] · ldx ..] for rows i < rows of A (row-major,
// K elements a row, f32 or bf16). One kernel per ISA, several rows and tokens a tile; every
// (row, token) sum is formed in the same order whatever the other rows and tokens of the
// call are (a token's result does not depend on its batch).
struct LoraDotsParams {
  const void* A = nullptr;
  DType dtype = DType::F32;
  int64_t K = 0, rows = 0;
  const float* x = nullptr;
  int64_t ldx = 0;
  const int32_t* toks = nullptr;
  int64_t n_toks = 0;
  float* u = nullptr;
  int64_t ldu = 0;
};
void lora_dots_scalar(const LoraDotsParams& p);
void lora_dots_avx2(const LoraDotsParams& p);
void lora_dots_avx512(const LoraDotsParams& p);
using LoraDotsKernel = void (*)(const LoraDotsParams&);
LoraDotsKernel lora_dots_kernel();  // the best one for this CPU (ATMOE_FORCE_ISA lowers it)

// ops::LoraMixParams (each block's A_b row-major, B_b packed panels) plus the CPU
// workspace: u and the work lists.
struct LoraMixParams : ops::LoraMixParams {
  float* u = nullptr;  // [T, Σ R_s]
  LoraPlan* plan = nullptr;

  LoraMixParams() = default;
  LoraMixParams(const ops::LoraMixParams& o) : ops::LoraMixParams(o) {}  // NOLINT: implicit on purpose
};

// Floats of u for these sites and T tokens (the plan holds the rest of the workspace).
int64_t lora_workspace_floats(const LoraMixParams& p);
void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool);
// The same on the calling thread alone, as thread `tid` of a pool of n_threads (its slice
// of the per-thread workspace; the work lists of the pool's calls): a side job beside the
// base GEMM (ThreadPool::set_side_job). Same results as lora_mix_apply.
void lora_mix_apply_alone(const LoraMixParams& p, int n_threads, int tid);
void lora_mix_apply_ref(const LoraMixParams& p);  // float64, single-threaded, no workspace

}  // namespace atmoe::cpu
