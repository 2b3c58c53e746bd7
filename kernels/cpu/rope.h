// Rotary position embedding, in place on x: [T, H, D] (row stride ldx between tokens,
// heads contiguous, D = head_dim), token t at position pos[t]; angle_i = pos * inv_freq[i],
// i < D/2. Interleaved: rotate pairs (2i, 2i+1) (GGUF llama). Neox: pairs (i, i + D/2)
// (HF rotate_half, GGUF qwen2).
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe::cpu {

using RopeParams = ops::RopeParams;

void rope(const RopeParams& p);
void rope_ref(const RopeParams& p);  // double-precision angles and products

}  // namespace atmoe::cpu
