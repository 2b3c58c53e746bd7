// Batched LoRA mixture on one site: shrink -> mix -> expand (DESIGN.md 1.3), SGMV-style:
// one shrink and one expand for a whole batch whose tokens use different mixes.
//   x:   [T, d_in] (stride ldx)                      y: [T, d_out] (stride ldy), y += Δ
//   A:   all experts' lora_A stacked, [R, d_in], packed panels (matmul.h), f32 or bf16
//   B:   all experts' lora_B side by side, [d_out, R], packed panels, same dtype
//   row_expert [R], row_scale [R]: the expert (column of coef; -1 = padding) and LoRA
//        scale s_e of each rank row
//   coef [T, ldc]: the routing coefficient of each expert for each token (λ · w_t[e])
//   blocks: [r0, r1) row ranges (multiples of kPanel: whole expert groups) with the tokens
//        that use them; rows outside every block and tokens not listed cost nothing.
//   u (workspace): [T, R]
// Δ[t] = Σ_{blocks b ∋ t} Σ_{r in b} B[:, r] · coef[t, e(r)] · s_{e(r)} · (A[r, :] · x[t])
// One parallel region: shrink+mix over (block, panel) items, a barrier, expand over
// output panels.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "common/dtype.h"

namespace atmoe { class ThreadPool; }

namespace atmoe::cpu {

struct LoraBlock {
  int64_t r0 = 0, r1 = 0;
  std::vector<int32_t> toks;  // tokens (rows of x, y, coef) that use this block
};

struct LoraMixParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const void* A = nullptr;
  const void* B = nullptr;
  DType dtype = DType::F32;
  const int32_t* row_expert = nullptr;
  const float* row_scale = nullptr;
  const float* coef = nullptr;
  int64_t ldc = 0;
  float* u = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t T = 0, d_in = 0, d_out = 0, R = 0;
  const LoraBlock* blocks = nullptr;
  int64_t n_blocks = 0;
  std::vector<std::pair<size_t, int64_t>>* items = nullptr;  // scratch for lora_mix_apply (reused)
};

void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool);
void lora_mix_apply_ref(const LoraMixParams& p);  // float64, single-threaded

}  // namespace atmoe::cpu
