// Causal attention over per-sequence KV caches with GQA, for a batch of sequences whose
// new tokens are packed one after another (prefill chunks and decode tokens alike).
//   q:   [T_total, Hq, D]  (row stride ldq)         out: [T_total, Hq, D] (stride ldo)
//   seq s owns query rows [t0, t0+T) and caches k, v: [P, Hkv, D] (row stride Hkv*D);
//   query row t sits at position pos[t] and attends to cache rows 0..pos[t] inclusive.
//   Query head h reads KV head h / (Hq / Hkv).
// Workspace: attention_workspace_floats (n_threads * max_ctx * Hq/Hkv: the scores of one
// query row's heads that share a KV head, per thread).
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/ops.h"

namespace atmoe { class ThreadPool; }

namespace atmoe::cpu {

using AttentionSeq = ops::AttentionSeq;
using AttentionParams = ops::AttentionParams;

int64_t attention_workspace_floats(const AttentionParams& p, int n_threads);
void attention(const AttentionParams& p, float* ws, ThreadPool& pool);
void attention_ref(const AttentionParams& p);  // double accumulation, single-threaded

}  // namespace atmoe::cpu
