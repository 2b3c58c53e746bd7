// Batched LoRA mixture on one site: shrink -> mix -> expand (DESIGN.md 1.3), SGMV-style:
// one shrink and one expand for a whole batch whose tokens use different mixes.
//   x:   [T, d_in] (stride ldx)                      y: [T, d_out] (stride ldy), y += Δ
//   A:   all experts' lora_A stacked, [R, d_in], packed panels (matmul.h), f32 or bf16
//   B:   all experts' lora_B side by side, [d_out, R], packed panels, same dtype
//   mix: [T, R]: the coefficient of rank row r for token t (λ · w_t[e(r)] · s_e; 0 where
//        the expert is inactive for that token)
//   active: [begin, end) row ranges of R, multiples of kPanel (whole expert groups);
//        rows outside every range cost nothing, and inside a range only the tokens whose
//        mix is nonzero there are computed (gathered rows: top-k routing pays for k groups).
//   u (workspace): [T, R]
// Two parallel regions per call: shrink over (group, panel) items, expand over output panels.
// Δ[t] = Σ_{r in active} B[:, r] · mix[t, r] · (A[r, :] · x[t])
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "common/dtype.h"

namespace atmoe { class ThreadPool; }

namespace atmoe::cpu {

// Reused between calls so the per-step path does not allocate (owned by the caller).
struct LoraScratch {
  std::vector<std::vector<int32_t>> toks;
  std::vector<std::pair<size_t, int64_t>> items;
};

struct LoraMixParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const void* A = nullptr;
  const void* B = nullptr;
  DType dtype = DType::F32;
  const float* mix = nullptr;
  float* u = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t T = 0, d_in = 0, d_out = 0, R = 0;
  std::vector<std::pair<int64_t, int64_t>> active;  // row ranges
  LoraScratch* scratch = nullptr;                    // required by lora_mix_apply
};

void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool);
void lora_mix_apply_ref(const LoraMixParams& p);  // float64, single-threaded

}  // namespace atmoe::cpu
