#include "kernels/cpu/lora.h"

#include <algorithm>
#include <cstring>
#include <atomic>
#include <functional>
#include <vector>

#include "common/error.h"
#include "kernels/cpu/matmul.h"
#include "kernels/thread_pool.h"

namespace atmoe::cpu {

static inline float row_coef(const LoraMixParams& p, const LoraSite& s, int64_t t, int64_t r) {
  const int32_t c = s.row_col[r];
  return c < 0 ? 0.f : p.coef[t * p.ldc + c] * s.row_scale[r];
}

int64_t lora_workspace_floats(const LoraMixParams& p) {
  int64_t R = 0;
  for (int i = 0; i < p.n_sites; ++i) R += p.sites[i].R;
  return p.T * R;
}

// Shrink items: every block with tokens, in pieces of at most 32 rows. Expand calls: per
// site, runs of consecutive blocks with the same token list merged into one call over
// several k ranges.
static void build_plan(const LoraMixParams& p, LoraPlan& pl) {
  pl.shrink.clear();
  pl.expand.clear();
  pl.toks.clear();
  pl.ranges.clear();
  pl.range_w.clear();
  const size_t es = dtype_size(p.dtype);
  for (int si = 0; si < p.n_sites; ++si) {
    const LoraSite& s = p.sites[si];
    int64_t prev_end = 0;
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      ATMOE_ASSERT(blk.r0 >= prev_end && blk.r0 <= blk.r1 && blk.r1 <= s.R);
      prev_end = blk.r1;
      if (blk.n_toks == 0 || blk.r0 == blk.r1) continue;
      for (int64_t r = blk.r0; r < blk.r1; r += kPanel) pl.shrink.push_back({si, b, r, std::min(blk.r1, r + kPanel)});
      pl.range_w.push_back(static_cast<const uint8_t*>(s.B) + size_t(lora_block_offset(s.d_out, blk.r0)) * es);
      bool merged = false;
      if (!pl.expand.empty() && pl.expand.back().site == si) {
        LoraPlan::Expand& e = pl.expand.back();
        const int64_t n = e.tok1 - e.tok0;
        if (n == blk.n_toks && std::equal(blk.toks, blk.toks + blk.n_toks, pl.toks.begin() + e.tok0)) {
          pl.ranges.push_back(blk.r0);
          pl.ranges.push_back(blk.r1);
          e.range1 += 2;
          merged = true;
        }
      }
      if (!merged) {
        LoraPlan::Expand e{si, int64_t(pl.ranges.size()), int64_t(pl.ranges.size()) + 2, int64_t(pl.toks.size()), 0};
        pl.ranges.push_back(blk.r0);
        pl.ranges.push_back(blk.r1);
        pl.toks.insert(pl.toks.end(), blk.toks, blk.toks + blk.n_toks);
        e.tok1 = int64_t(pl.toks.size());
        pl.expand.push_back(e);
      }
    }
  }
}

// One rank row · one activation row, f32 accumulation (the shrink of blocks with few tokens).
__attribute__((target_clones("avx512f", "avx2", "default"))) static float dot_row_f32(const float* a, const float* x,
                                                                                      int64_t K) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += a[k] * x[k];
  return s;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) static float dot_row_bf16(const uint16_t* a,
                                                                                       const float* x, int64_t K) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += bf16_to_f32(a[k]) * x[k];
  return s;
}

// One rank row · four activation rows: the row is read once for the four tokens.
template <class W>
static inline float wval(W a) {
  if constexpr (sizeof(W) == 2) return bf16_to_f32(a);
  else return a;
}

template <class W>
__attribute__((always_inline)) static inline void dot_row4(const W* a, const float* x0, const float* x1,
                                                           const float* x2, const float* x3, int64_t K, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < K; ++k) {
    const float w = wval(a[k]);
    s0 += w * x0[k];
    s1 += w * x1[k];
    s2 += w * x2[k];
    s3 += w * x3[k];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) static void dot_row4_f32(
    const float* a, const float* x0, const float* x1, const float* x2, const float* x3, int64_t K, float* out) {
  dot_row4(a, x0, x1, x2, x3, K, out);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) static void dot_row4_bf16(
    const uint16_t* a, const float* x0, const float* x1, const float* x2, const float* x3, int64_t K, float* out) {
  dot_row4(a, x0, x1, x2, x3, K, out);
}

// Shrink of rows [r0, r1) of a block with few tokens: u[t, r] = A[r, :] · x[t], tokens four
// at a time, then one at a time.
static void shrink_dots(const LoraMixParams& p, const LoraSite& s, const LoraBlock& blk, int64_t r0, int64_t r1,
                        float* u0, int64_t ldu) {
  const int64_t nt = blk.n_toks;
  const bool bf16 = p.dtype == DType::BF16;
  const int64_t row_bytes = p.d_in * int64_t(dtype_size(p.dtype));
  for (int64_t r = r0; r < r1; ++r) {
    const void* a = static_cast<const uint8_t*>(s.A) + r * row_bytes;
    int64_t j = 0;
    for (; j + 4 <= nt; j += 4) {
      const int32_t* t = blk.toks + j;
      const float* x0 = p.x + int64_t(t[0]) * p.ldx;
      const float* x1 = p.x + int64_t(t[1]) * p.ldx;
      const float* x2 = p.x + int64_t(t[2]) * p.ldx;
      const float* x3 = p.x + int64_t(t[3]) * p.ldx;
      float o[4];
      if (bf16) dot_row4_bf16(static_cast<const uint16_t*>(a), x0, x1, x2, x3, p.d_in, o);
      else dot_row4_f32(static_cast<const float*>(a), x0, x1, x2, x3, p.d_in, o);
      for (int i = 0; i < 4; ++i) u0[int64_t(t[i]) * ldu + r] = o[i];
    }
    for (; j < nt; ++j) {
      const int32_t t = blk.toks[j];
      const float* x = p.x + int64_t(t) * p.ldx;
      u0[int64_t(t) * ldu + r] = bf16 ? dot_row_bf16(static_cast<const uint16_t*>(a), x, p.d_in)
                                      : dot_row_f32(static_cast<const float*>(a), x, p.d_in);
    }
  }
}

// Rows [r0, r0 + n) of a row-major [R, K] matrix -> one packed panel [K][32] (matmul.h).
template <class W>
static void pack_panel(const W* A, int64_t r0, int64_t n, int64_t K, W* out) {
  for (int64_t j = 0; j < n; ++j) {
    const W* a = A + (r0 + j) * K;
    for (int64_t k = 0; k < K; ++k) out[k * kPanel + j] = a[k];
  }
}

void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool) {
  ATMOE_ASSERT(p.plan != nullptr && p.n_sites >= 0);
  LoraPlan& pl = *p.plan;
  build_plan(p, pl);
  if (pl.shrink.empty()) return;
  const PanelKernel kern = panel_kernel();
  // u column offset of each site; expand work: (site, chunk of output panels).
  int64_t u_off[16];
  ATMOE_ASSERT(p.n_sites <= 16);
  int64_t ldu = 0;
  for (int i = 0; i < p.n_sites; ++i) {
    u_off[i] = ldu;
    ldu += p.sites[i].R;
  }
  struct Chunk {
    int32_t site;
    int64_t p0, p1, call0, call1;
  };
  std::vector<Chunk> chunks;  // small: tens of entries
  {
    int64_t total = 0;
    for (int i = 0; i < p.n_sites; ++i) total += (p.sites[i].d_out + kPanel - 1) / kPanel;
    const int64_t per = std::max<int64_t>(1, total / (4 * int64_t(pool.size())));
    size_t c = 0;
    for (int i = 0; i < p.n_sites; ++i) {
      const size_t c0 = c;
      while (c < pl.expand.size() && pl.expand[c].site == i) ++c;
      if (c0 == c) continue;
      const int64_t np = (p.sites[i].d_out + kPanel - 1) / kPanel;
      for (int64_t a = 0; a < np; a += per) chunks.push_back({i, a, std::min(np, a + per), int64_t(c0), int64_t(c)});
    }
  }
  const int64_t n_shrink = int64_t(pl.shrink.size()), n_chunks = int64_t(chunks.size());
  std::atomic<int64_t> next_shrink{0}, next_chunk{0};
  std::atomic<int> arrived{0};
  const size_t esize = dtype_size(p.dtype), ws_per = size_t(kPanel * p.d_in) * esize;
  if (pl.panel_ws.size() < ws_per * size_t(pool.size())) pl.panel_ws.assign(ws_per * size_t(pool.size()), 0);
  // Small work (decode of a few tokens through a few experts: microseconds) runs on the
  // calling thread: a parallel region with a barrier costs more than it would save.
  int64_t work = 0;
  for (const auto& it : pl.shrink)
    work += (it.r1 - it.r0) * p.sites[it.site].blocks[it.block].n_toks * p.d_in;
  for (const auto& e : pl.expand) {
    int64_t k = 0;
    for (int64_t r = e.range0; r < e.range1; r += 2) k += pl.ranges[size_t(r + 1)] - pl.ranges[size_t(r)];
    work += k * (e.tok1 - e.tok0) * p.sites[e.site].d_out;
  }
  const std::function<void(int, int)> job = [&](int tid, int nt) {
    // Shrink + mix: u[t, r] = (A[r, :] · x[t]) · coef(t, r) for the block's rows and tokens.
    uint8_t* ws = pl.panel_ws.data() + ws_per * size_t(tid);
    for (int64_t i; (i = next_shrink.fetch_add(1, std::memory_order_relaxed)) < n_shrink;) {
      const LoraPlan::Shrink& it = pl.shrink[size_t(i)];
      const LoraSite& s = p.sites[it.site];
      const LoraBlock& blk = s.blocks[it.block];
      const int64_t nt_blk = blk.n_toks, nrows = it.r1 - it.r0;
      float* u0 = p.u + u_off[it.site];
      if (nt_blk < kLoraPackMinTokens) {
        shrink_dots(p, s, blk, it.r0, it.r1, u0, ldu);
      } else {
        if (p.dtype == DType::BF16)
          pack_panel(static_cast<const uint16_t*>(s.A), it.r0, nrows, p.d_in, reinterpret_cast<uint16_t*>(ws));
        else
          pack_panel(static_cast<const float*>(s.A), it.r0, nrows, p.d_in, reinterpret_cast<float*>(ws));
        MatmulParams m;
        m.x = p.x;
        m.ldx = p.ldx;
        m.w = ws;
        m.w_dtype = p.dtype;
        m.y = u0 + it.r0;
        m.ldy = ldu;
        m.T = nt_blk;
        m.N = nrows;
        m.K = p.d_in;
        m.x_rows = blk.toks;
        m.y_rows = blk.toks;
        kern(m, 0, 1);
      }
      for (int64_t ti = 0; ti < blk.n_toks; ++ti) {
        const int32_t t = blk.toks[ti];
        float* u = u0 + int64_t(t) * ldu;
        for (int64_t r = it.r0; r < it.r1; ++r) u[r] *= row_coef(p, s, t, r);
      }
    }
    ThreadPool::barrier(arrived, nt);
    // Expand: y_s[t] += B_s[:, ranges] · u[t, ranges] over the chunk's output panels.
    for (int64_t i; (i = next_chunk.fetch_add(1, std::memory_order_relaxed)) < n_chunks;) {
      const Chunk& ch = chunks[size_t(i)];
      const LoraSite& s = p.sites[ch.site];
      for (int64_t c = ch.call0; c < ch.call1; ++c) {
        const LoraPlan::Expand& e = pl.expand[size_t(c)];
        MatmulParams m;
        m.x = p.u + u_off[ch.site];
        m.ldx = ldu;
        m.w = s.B;
        m.w_dtype = p.dtype;
        m.y = s.y;
        m.ldy = s.ldy;
        m.T = e.tok1 - e.tok0;
        m.N = s.d_out;
        m.K = s.R;
        m.accumulate = true;
        m.k_ranges = pl.ranges.data() + e.range0;
        m.n_k_ranges = (e.range1 - e.range0) / 2;
        m.k_range_w = pl.range_w.data() + e.range0 / 2;
        m.x_rows = pl.toks.data() + e.tok0;
        m.y_rows = m.x_rows;
        kern(m, ch.p0, ch.p1);
      }
    }
  };
  if (work < kLoraInlineMacs || pool.size() == 1)
    job(0, 1);
  else
    pool.run(job);
}

void lora_prepare_b(const float* B, int64_t d_out, int64_t R, const int64_t* bounds, int64_t n_blocks, DType dt,
                    void* out) {
  ATMOE_ASSERT(dt == DType::F32 || dt == DType::BF16);
  const size_t es = dtype_size(dt);
  std::memset(out, 0, packed_elems(d_out, R) * es);  // panel padding rows stay zero
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t r0 = bounds[2 * b], r1 = bounds[2 * b + 1];
    ATMOE_ASSERT(0 <= r0 && r0 <= r1 && r1 <= R);
    for (int64_t n = 0; n < d_out; ++n)
      for (int64_t r = r0; r < r1; ++r) {
        const size_t at = size_t(lora_b_index(d_out, r0, r1, n, r));
        const float v = B[n * R + r];
        if (dt == DType::F32)
          static_cast<float*>(out)[at] = v;
        else
          static_cast<uint16_t*>(out)[at] = f32_to_bf16(v);
      }
  }
}

static float lora_b_at(const void* B, DType dt, int64_t d_out, int64_t r0, int64_t r1, int64_t n, int64_t r) {
  const size_t at = size_t(lora_b_index(d_out, r0, r1, n, r));
  return dt == DType::F32 ? static_cast<const float*>(B)[at] : bf16_to_f32(static_cast<const uint16_t*>(B)[at]);
}

void lora_mix_apply_ref(const LoraMixParams& p) {
  for (int si = 0; si < p.n_sites; ++si) {
    const LoraSite& s = p.sites[si];
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      for (int64_t ti = 0; ti < blk.n_toks; ++ti) {
        const int32_t t = blk.toks[ti];
        std::vector<double> u(static_cast<size_t>(blk.r1 - blk.r0), 0.0);
        for (int64_t r = blk.r0; r < blk.r1; ++r) {
          double acc = 0;
          for (int64_t k = 0; k < p.d_in; ++k) {  // A row-major
            const size_t at = size_t(r * p.d_in + k);
            const double a = p.dtype == DType::BF16 ? double(bf16_to_f32(static_cast<const uint16_t*>(s.A)[at]))
                                                    : double(static_cast<const float*>(s.A)[at]);
            acc += double(p.x[t * p.ldx + k]) * a;
          }
          u[size_t(r - blk.r0)] = acc * double(row_coef(p, s, t, r));
        }
        for (int64_t n = 0; n < s.d_out; ++n) {
          double acc = 0;
          for (int64_t r = blk.r0; r < blk.r1; ++r)
            acc += double(lora_b_at(s.B, p.dtype, s.d_out, blk.r0, blk.r1, n, r)) * u[size_t(r - blk.r0)];
          s.y[t * s.ldy + n] = float(double(s.y[t * s.ldy + n]) + acc);
        }
      }
    }
  }
}

}  // namespace atmoe::cpu
