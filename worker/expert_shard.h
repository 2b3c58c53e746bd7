// The stacked LoRA banks of a subset of an AT-MoE bundle's expert groups (DESIGN.md 3):
// what a worker rank holds, or the coordinator itself when it runs alone (N = 1). Nothing
// else: no router, no routing state, no f32 copies of the adapters. Memory follows the
// adapters' bytes in the model dtype, whatever the grouping.
//
// Columns: the shard numbers its experts 0..C-1 in block order (its groups in the order
// given, each group's experts in manifest order, then the general expert when held).
// Coefficient rows given to apply() are in that column order.
//
// Stack of one (layer, site): the rows of every block back to back (a block = one group,
// or the general expert); each expert that adapts the module contributes its r_e rows
// (heterogeneous ranks); no padding anywhere.
//   block [n_blocks]: row range of each block (empty when no expert of the block adapts it);
//   each block's A_b [rows, d_in] row-major and B_b [d_out, rows] prepared by the shard's
//   backend (Backend::prepare_lora_b), model dtype, in the shard's arena (one allocation in
//   that backend's memory: group by group, layer by layer, per site input the A_b of its
//   sites then their B_b, the order a decode step reads them);
//   row_col [R]: the column (expert) of each row; row_scale [R]: its LoRA scale.
// The stacks' descriptors are compact, in (layer, site) order, so that a site input's lie
// together: the block table (host) and the row tables (one backend buffer). A decode step
// finds them cold (the base weights streamed by since the last step): build() (from
// apply()) prefetches the input's few lines at once instead of chasing one allocation per
// stack.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/bundle.h"
#include "common/model_config.h"
#include "common/peft_adapter.h"
#include "common/tensor.h"
#include "kernels/backend.h"

namespace atmoe {

struct ShardSpec {
  SiteShapes shapes;
  int64_t head_dim = 0;
  bool permute_qk = false;  // GGUF llama base: lora_B rows of q/k follow the rope permutation
  DType dtype = DType::F32;
  std::vector<int> groups;  // bundle group indices held, in this order
  bool general = false;     // also hold the bundle's general expert (the last block)
  Backend* backend = nullptr;  // where the banks live and apply() runs; nullptr: a CPU context of its own
};

// The rank rows of one (layer, site): R rows in blocks (one per expert group held, in
// order; empty where the group has no adapter on this module). Each block's A_b and B_b
// (ops.h) lie in the shard's arena.
struct StackBlock {
  int64_t r0 = 0, r1 = 0;   // the block's rows [r0, r1)
  const void* A = nullptr;  // A_b, B_b (null when empty)
  const void* B = nullptr;
};
struct ShardStack {
  int64_t R = 0, d_in = 0, d_out = 0;
  const StackBlock* block = nullptr;  // [n_blocks], in the shard's block table
  const int32_t* row_col = nullptr;   // [R], backend memory (the shard's row tables)
  const float* row_scale = nullptr;   // [R]
};

class ExpertShard {
 public:
  // Loads the experts of spec.groups (and the general expert): each adapter is read,
  // checked, copied into the stacks and dropped before the next one is read.
  ExpertShard(const Bundle& b, const ShardSpec& spec);
  ~ExpertShard();
  ExpertShard(const ExpertShard&) = delete;
  ExpertShard& operator=(const ExpertShard&) = delete;

  const ShardSpec& spec() const { return spec_; }
  int n_columns() const { return int(column_expert_.size()); }
  // [C]: the bundle expert index of each column; the bundle's expert count for the general expert.
  const std::vector<int>& column_expert() const { return column_expert_; }
  // [n_blocks]: the columns of each block, [c0, c1).
  const std::vector<std::pair<int, int>>& block_columns() const { return block_cols_; }
  const ShardStack& stack(int layer, Site s) const { return stacks_[size_t(layer) * kNumSites + size_t(s)]; }
  // True when any site of `in` in `layer` has rows here.
  bool has_input(int layer, SiteInput in) const;
  int64_t d_in(SiteInput in) const;
  int64_t out_cols(SiteInput in) const;     // Σ d_out of the input's sites
  int64_t bytes() const { return bytes_; }  // the stacks' weights and row tables

  // y[t, :] += Δ of every site of `in` for the T rows of x ([T, d_in(in)], stride ldx), with
  // coef [T, ldc] in this shard's column order; y: [T, out_cols(in)] (stride ldy), the
  // input's sites side by side. Blocks whose columns are all zero for a token cost nothing.
  // x, y: the backend's memory; coef: host memory (it picks the blocks each token uses).
  // Not thread-safe (one scratch per shard).
  void apply(int layer, SiteInput in, const float* x, int64_t ldx, const float* coef, int64_t ldc, float* y,
             int64_t ldy, int64_t T) const;
  // apply() in two halves around the base GEMM of `in`, the experts computed beside it
  // (Backend::lora_mix_beside: on the CPU, one pool thread computes them while the others
  // stream the GEMM's weights): post() before the GEMM, finish(y) after it adds the deltas
  // into y. Same arguments as apply(); x and coef must stay as they are until finish().
  // post() returns false when the backend cannot (nothing is pending: call apply()).
  // A post() without its finish() (an exception in between) is dropped, not run, by the
  // next post() or apply() and by the destructor; the pool offers it to the next parallel
  // region only (ThreadPool::set_side_job).
  bool post(int layer, SiteInput in, const float* x, int64_t ldx, const float* coef, int64_t ldc, int64_t T) const;
  void finish(float* y, int64_t ldy) const;

  // Work done since construction (tests and benchmarks).
  struct Counters {
    int64_t applies = 0;     // apply() calls that computed something
    int64_t token_rows = 0;  // Σ over those calls of the tokens that used a block here
  };
  const Counters& counters() const { return counters_; }

 private:
  ShardSpec spec_;
  std::unique_ptr<Backend> own_be_;  // spec.backend == nullptr: this shard's CPU context (its LoRA plan cache)
  Backend* be_;
  std::vector<int> column_expert_;
  std::vector<std::pair<int, int>> block_cols_;
  std::vector<ShardStack> stacks_;  // [L * kNumSites]
  Buffer arena_;                    // every block's weights (the layout above)
  std::vector<StackBlock> blocks_;  // [L * kNumSites * n_blocks]: every stack's block table
  Buffer rows_;                     // every stack's row_col then row_scale, 64-byte aligned
  int64_t bytes_ = 0;
  struct Scratch {
    std::vector<ops::LoraBlock> blocks[3];
    std::vector<std::vector<int32_t>> toks;  // [n_blocks]: the tokens that use each block
    Buffer ws;
    Buffer coef;  // device backends: coef in backend memory
    std::vector<uint8_t> uses;
    ops::LoraSite sites[3];
    int64_t site_col[3] = {};  // each built site's first column in the input's output
    // post(): its op; the deltas [T, out_cols] (zero outside a call posted beside the GEMM:
    // finish() adds and clears the rows it wrote), their row stride and the tokens that use
    // a block; and what finish() has to do: join the computation beside the GEMM and add the
    // deltas, or (the backend declined) run the op into y.
    ops::LoraMixParams post;
    std::vector<float> delta;
    int64_t delta_ld = 0;
    std::vector<int32_t> delta_rows;
    enum class Pending { None, Beside, After } pending = Pending::None;
  };
  mutable Scratch s_;
  // s_.uses[t * n_blocks + b] = token t gives block b a nonzero coefficient; returns the
  // number of tokens that use any block.
  int64_t mark_uses(const float* coef, int64_t ldc, int64_t T) const;
  // Drops a pending post() (Backend::lora_mix_cancel) and clears its deltas.
  void abandon() const;
  // Prefetches the descriptors of (layer, in)'s stacks: their block tables and (host
  // memory) row tables.
  void prefetch_input(int layer, SiteInput in) const;
  // The op's params p for (layer, in) and these rows (its site and block descriptors in s_);
  // returns the tokens that use a block here, 0 when there is nothing to compute.
  int64_t build(int layer, SiteInput in, const float* x, int64_t ldx, const float* coef, int64_t ldc, float* y,
                int64_t ldy, int64_t T, ops::LoraMixParams& p) const;
  mutable Counters counters_;
};

// One PEFT adapter alone as a shard (one group of one expert, column 0) on the shapes,
// dtype and row layout of `base`: a run-time adapter (the server's load_lora_adapter).
std::unique_ptr<ExpertShard> adapter_shard(const ShardSpec& base, const std::string& name, const std::string& dir);

// d_in / d_out of every site of a model config.
SiteShapes site_shapes(const ModelConfig& c);
// The shard spec of a model config: site shapes, head_dim and the q/k row permutation.
ShardSpec shard_spec(const ModelConfig& c, DType dtype, std::vector<int> groups, bool general);

}  // namespace atmoe
