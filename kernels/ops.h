// The parameters of every op, one struct per op, shared by all backends (kernels/backend.h):
// the CPU backend (kernels/cpu/, the specification) and the CUDA backend (kernels/cuda/)
// read the same struct. Flat pointers and sizes only: no STL, nothing owned.
//
// Memory of the pointers:
//   - data (activations, prepared weights, KV rows, positions, coefficients, row tables):
//     memory of the backend that runs the op (Backend::alloc, Backend::prepare_*);
//   - descriptors (AttentionSeq[], LoraSite[], LoraBlock[] and the token lists of the
//     blocks): host memory built by the caller for this call; a device backend copies what
//     its kernels read into the op's workspace (the workspace query accounts for it).
// Shapes are in elements; ld* are row strides in elements. Activations are f32.
// Weights are *prepared* (Backend::prepare_weight / prepare_lora_b): their layout is the
// backend's private choice (CPU: packed panels of 32 rows, kernels/cpu/matmul.h; CUDA:
// row-major [N, K]); their element type is F32 or BF16.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace atmoe::ops {

// y[T, N] (=|+=) x[T, K] · W[N, K]^T (+ bias[N]), f32 accumulation. With BF16 weights a
// device backend may round x to bf16 for its tensor-core GEMM (CUDA: T > 8, as llama.cpp's
// CUDA backend does): the bf16 path meets the bf16 tolerances, the f32 path the f32 ones.
struct MatmulParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;  // prepared [N, K]
  DType w_dtype = DType::F32;
  const float* bias = nullptr;  // optional [N]
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t T = 0, N = 0, K = 0;
  bool accumulate = false;  // y += x W^T instead of y = x W^T
};

// y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * w[:]; x, y: [T, D] (y may alias x); w: [D].
struct RmsNormParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* w = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t T = 0, D = 0;
  float eps = 1e-5f;
};

// Rotary embedding in place on x: [T, H, D] (row stride ldx, heads contiguous), token t at
// position pos[t]; angle_i = pos * inv_freq[i], i < D/2. Interleaved: pairs (2i, 2i+1)
// (GGUF llama); neox: pairs (i, i + D/2) (HF rotate_half).
struct RopeParams {
  float* x = nullptr;
  int64_t ldx = 0;
  int64_t T = 0, H = 0, D = 0;
  const int32_t* pos = nullptr;     // [T]
  const float* inv_freq = nullptr;  // [D/2]
  bool neox = true;
};

// out[t, i] = silu(g[t, i]) * u[t, i]; g, u, out: [T, F] (out may alias g).
struct SiluMulParams {
  const float* g = nullptr;
  int64_t ldg = 0;
  const float* u = nullptr;
  int64_t ldu = 0;
  float* out = nullptr;
  int64_t ldo = 0;
  int64_t T = 0, F = 0;
};

// Causal attention with GQA over per-sequence KV caches, for sequences whose new query rows
// are packed one after another (prefill chunks and decode tokens alike).
//   q: [T_total, Hq, D] (stride ldq); out: [T_total, Hq, D] (stride ldo)
//   sequence s owns query rows [t0, t0 + T) and caches k, v: [P, Hkv, D] (row stride Hkv*D);
//   query row t is at position pos[t] and attends to cache rows 0..pos[t] inclusive;
//   query head h reads KV head h / (Hq / Hkv).
struct AttentionSeq {
  int64_t t0 = 0, T = 0;
  const float* k = nullptr;
  const float* v = nullptr;
  const int32_t* pos = nullptr;  // [T]: positions of this sequence's query rows
};

struct AttentionParams {
  const float* q = nullptr;
  int64_t ldq = 0;
  float* out = nullptr;
  int64_t ldo = 0;
  int64_t Hq = 0, Hkv = 0, D = 0;
  float scale = 1.f;
  const AttentionSeq* seqs = nullptr;  // host descriptors
  int64_t n_seqs = 0;
  int64_t max_ctx = 0;  // >= every pos + 1
};

// Batched LoRA mixture on one site input (DESIGN.md 1.3): shrink -> mix -> expand for every
// site fed by the same activations, for a batch whose tokens use different mixes (SGMV).
//   x: [T, d_in] (stride ldx); coef: [T, ldc], the routing coefficient of each column
//   (expert) for each token. Per site s, R_s rank rows in blocks (one expert group each):
//     row_col_s [R_s] (column of coef; -1 = none), row_scale_s [R_s] (the LoRA scale);
//     blocks_s: ascending disjoint [r0, r1) row ranges (no padding) with the tokens that use
//       them; rows outside every block and tokens not listed cost nothing. Each block says
//       where its weights are, anywhere in backend memory (the caller lays them out; an
//       expert shard puts a block's weights for every site of the input in one run, so a
//       decode step reads one stretch of memory per active group):
//       A_b: [r1 − r0, d_in] row-major in dtype (a rank row contiguous; the same on every
//         backend), A_b[i] = A_s[r0 + i];
//       B_b: [d_out_s, r1 − r0], prepared by Backend::prepare_lora_b;
//     y_s: [T, d_out_s] (stride ldy_s), y_s += Δ_s with
//   Δ_s[t] = Σ_{blocks b ∋ t} Σ_{r in b} B_s[:, r] · coef[t, col(r)] · scale(r) · (A_s[r, :] · x[t]).
struct LoraBlock {
  int64_t r0 = 0, r1 = 0;
  const void* A = nullptr;        // A_b (may be null when r0 == r1)
  const void* B = nullptr;        // B_b (may be null when r0 == r1)
  const int32_t* toks = nullptr;  // host: tokens (rows of x, y, coef) that use this block
  int64_t n_toks = 0;
};

struct LoraSite {
  int64_t R = 0, d_out = 0;
  const int32_t* row_col = nullptr;
  const float* row_scale = nullptr;
  const LoraBlock* blocks = nullptr;  // host descriptors
  int64_t n_blocks = 0;
  float* y = nullptr;
  int64_t ldy = 0;
};

struct LoraMixParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  int64_t T = 0, d_in = 0;
  DType dtype = DType::F32;  // of every A and B
  const float* coef = nullptr;
  int64_t ldc = 0;
  const LoraSite* sites = nullptr;  // host descriptors
  int n_sites = 0;
};

// T-REX / Intuition-MoR1E rank-1 experts on one module (DESIGN.md 1.2), tokens of sequences
// with different intuitions:
//   u = A x (A: [r1, d_in]); p = softmax(W_r x) (W_r: [E, d_in], E = r1·r2);
//   g = c_p·ω'·p + c_s·(1 − ω')·s_t; G = reshape(g, r1 × r2) (rank1: G = diag(g));
//   Δy = σ(100γ) · B (Gᵀ u) (B: [d_out, r2]).
constexpr double kTrexTokenCoef = 32.0;  // c_p in the released code
constexpr double kTrexTaskCoef = 4.0;    // c_s

struct TrexParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const void* AW = nullptr;  // prepared [R, d_in]: rows 0..r1-1 = A, r1..r1+E-1 = W_r, R >= r1+E (rest zero)
  const void* B = nullptr;   // prepared [d_out, r2]
  DType dtype = DType::F32;
  int64_t R = 0;
  int64_t T = 0, d_in = 0, d_out = 0, r1 = 0, r2 = 0, E = 0;
  bool diagonal = false;          // rank1 mode
  const int32_t* rows = nullptr;  // optional [T]: token j of this call is row rows[j] of x and y
  const float* s = nullptr;       // [T, E]: the intuition term of each token (nullptr = 0)
  const float* omega = nullptr;   // [T]: ω' = σ(100 ω) per token, in [0, 1]
  float gate = 1.f;               // σ(100 γ)
  float* y = nullptr;
  int64_t ldy = 0;
};

// Numerically stable softmax over each row of x: [R, C] (stride ld), in place, of
// scale · x; -inf entries get 0; a row that is all -inf is left all zero.
struct SoftmaxParams {
  float* x = nullptr;
  int64_t ld = 0;
  int64_t R = 0, C = 0;
  float scale = 1.f;
};

// Per row of logits [R, V] (stride ld): the sampled token id into out[r] (backend memory).
//   temperature <= 0: greedy (argmax, lowest id on ties);
//   else softmax(logits / temperature); drop tokens below min_p × the most probable one's
//   probability; keep the top_k most probable (0 = all), then the smallest prefix by
//   descending probability whose mass reaches top_p (ties at the cut kept in id order);
//   renormalise and pick by the row's uniform draw u[r] in [0, 1): the first token (by
//   descending probability, then id) whose cumulative mass exceeds u · kept mass.
// Per-row knobs are host arrays; an absent one takes its default for every row
// (temperature 0 = greedy, top_k 0, top_p 1, min_p 0); u is required for sampled rows.
struct SampleParams {
  const float* logits = nullptr;
  int64_t ld = 0;
  int64_t R = 0, V = 0;
  const float* temperature = nullptr;  // host [R]
  const int32_t* top_k = nullptr;      // host [R]
  const float* top_p = nullptr;        // host [R]
  const float* min_p = nullptr;        // host [R]
  const double* u = nullptr;           // host [R]
  int32_t* out = nullptr;              // backend [R]
};

}  // namespace atmoe::ops
