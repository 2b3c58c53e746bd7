// Checks of weights read from files, shared by every loader (adapters, the general
// expert, T-REX tensors, centroids, routers, and the base model on --check-tensors).
#pragma once
#include <string>

#include "common/tensor.h"

namespace atmoe {

// InputError "FILE: tensor 'NAME' holds NaN at index I" (or +Inf/-Inf) unless every element
// of `t` (F32, F16 or BF16) is finite.
void check_finite(const Tensor& t, const std::string& file, const std::string& name);

// Largest |x| of an F32 tensor (0 for an empty one).
float max_abs_f32(const Tensor& t);

// A LoRA module's delta y = s · B (A x) stays finite in f32 for inputs of magnitude ~1:
// refuses (InputError naming the file and module) a scale that is not finite in f32 (it may
// be negative), or |s| · r · max|B| · max|A| · d_in above sqrt(FLT_MAX) (a delta whose square
// overflows f32 in the next RMSNorm). A [r, d_in], B [d_out, r], f32.
void check_lora_bound(double scale, const Tensor& A, const Tensor& B, const std::string& file,
                      const std::string& module);

}  // namespace atmoe
