// Causal attention with GQA over per-sequence KV caches on the device; the CPU twin
// kernels/cpu/attention.h (attention_ref) is the specification (ops::AttentionParams).
//
// The sequence descriptors of ops::AttentionParams are host memory; the backend copies a
// device table of them into the op's workspace (attention_workspace_bytes, layout below)
// and passes its device address here:
//   ws + 0:                      AttnSeqDev[n_seqs]   (k, v, pos, t0 of each sequence)
//   ws + align256(that):         AttnRowDev[n_rows]   (one per query row: its sequence and
//                                                      its index t inside the sequence)
// n_rows = Σ_s seqs[s].T. One block per (query row, query head): 8 warps split the keys
// 0..pos[t] four at a time, each warp keeps an online softmax (running max m, sum l and
// acc[D], lanes over D) in f32; the warps are merged through shared memory at the end.
// q is copied to shared memory first, so out may alias q. D <= kAttnMaxD.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/ops.h"

namespace atmoe::cuda {

constexpr int64_t kAttnMaxD = 256;

struct AttnSeqDev {
  const float* k = nullptr;  // [P, Hkv, D]
  const float* v = nullptr;
  const int32_t* pos = nullptr;  // [T] device
  int64_t t0 = 0;
};

struct AttnRowDev {
  int32_t seq = 0;  // index into the AttnSeqDev table
  int32_t t = 0;    // row inside the sequence: q row t0 + t, position pos[t]
};

inline size_t attn_align256(size_t b) {
  return (b + 255) / 256 * 256;
}
inline size_t attention_rows_offset(int64_t n_seqs) {
  return attn_align256(size_t(n_seqs) * sizeof(AttnSeqDev));
}
inline size_t attention_workspace_bytes(int64_t n_seqs, int64_t n_rows) {
  return n_rows <= 0 ? 0 : attention_rows_offset(n_seqs) + size_t(n_rows) * sizeof(AttnRowDev);
}

// p supplies q, ldq, out, ldo, Hq, Hkv, D, scale (p.seqs is not read); seqs and rows are
// the device tables above. Returns the launch's cudaError_t as int (0 = success).
int attention(const ops::AttentionParams& p, const AttnSeqDev* seqs, const AttnRowDev* rows, int64_t n_rows,
              void* stream);

}  // namespace atmoe::cuda
