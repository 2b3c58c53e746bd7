// Numerically stable softmax over each row of x: [R, C], in place; scale is applied to the
// logits first (1/temperature). -inf entries get probability 0; a row that is all -inf
// is left all zero.
#pragma once
#include <cstdint>

namespace atmoe::cpu {

void softmax_rows(float* x, int64_t R, int64_t C, float scale = 1.f);
void softmax_rows_ref(float* x, int64_t R, int64_t C, float scale = 1.f);

}  // namespace atmoe::cpu
