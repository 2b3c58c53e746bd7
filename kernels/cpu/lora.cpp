#include "kernels/cpu/lora.h"

#include <algorithm>
#include <cstring>
#include <atomic>
#include <vector>

#include "common/error.h"
#include "kernels/cpu/cpu_features.h"
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
  for (int si = 0; si < p.n_sites; ++si) {
    const LoraSite& s = p.sites[si];
    int64_t prev_end = 0;
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      ATMOE_ASSERT(blk.r0 >= prev_end && blk.r0 <= blk.r1 && blk.r1 <= s.R);
      prev_end = blk.r1;
      if (blk.n_toks == 0 || blk.r0 == blk.r1) continue;
      for (int64_t r = blk.r0; r < blk.r1; r += kPanel) pl.shrink.push_back({si, b, r, std::min(blk.r1, r + kPanel)});
      ATMOE_ASSERT(blk.A != nullptr && blk.B != nullptr);
      pl.range_w.push_back(blk.B);
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

// The scalar ISA's few-token shrink: one (row, token) sum at a time (vectorised by
// -fopenmp-simd where the compiler can).
template <class W>
static void dots_scalar(const LoraDotsParams& p) {
  const W* A = static_cast<const W*>(p.A);
  for (int64_t j = 0; j < p.n_toks; ++j) {
    const float* x = p.x + int64_t(p.toks[j]) * p.ldx;
    float* u = p.u + int64_t(p.toks[j]) * p.ldu;
    for (int64_t i = 0; i < p.rows; ++i) {
      const W* a = A + i * p.K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < p.K; ++k) {
        if constexpr (sizeof(W) == 2) s += bf16_to_f32(a[k]) * x[k];
        else s += a[k] * x[k];
      }
      u[i] = s;
    }
  }
}

void lora_dots_scalar(const LoraDotsParams& p) {
  if (p.dtype == DType::BF16) dots_scalar<uint16_t>(p);
  else dots_scalar<float>(p);
}

LoraDotsKernel lora_dots_kernel() {
  switch (best_isa()) {
    case Isa::Avx512: return lora_dots_avx512;
    case Isa::Avx2: return lora_dots_avx2;
    default: return lora_dots_scalar;
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

// Software prefetch of the weights sites [s0, s1) read: each block with tokens, A_b then B_b
// (an expert shard's arena order, ops.h). A decode call's rank rows come from DRAM (the base
// weights streamed through every cache since the last step): the prefetches put the whole
// call's lines in flight at once instead of a few rows' at a time.
static void prefetch_sites(const LoraMixParams& p, int s0, int s1) {
  const size_t es = dtype_size(p.dtype);
  const auto fetch = [](const void* at, size_t n) {
    const char* c = static_cast<const char*>(at);
    for (size_t o = 0; o < n; o += 64) __builtin_prefetch(c + o, 0, 3);
  };
  for (int pass = 0; pass < 2; ++pass)
    for (int si = s0; si < s1; ++si) {
      const LoraSite& s = p.sites[si];
      for (int64_t b = 0; b < s.n_blocks; ++b) {
        const LoraBlock& blk = s.blocks[b];
        if (blk.n_toks == 0 || blk.r0 == blk.r1) continue;
        const int64_t rows = blk.r1 - blk.r0;
        if (pass == 0) fetch(blk.A, size_t(rows * p.d_in) * es);
        else fetch(blk.B, size_t(packed_rows(s.d_out) * rows) * es);
      }
    }
}

namespace {

// One call's state shared by the work items.
struct Call {
  const LoraMixParams& p;
  LoraPlan& pl;
  PanelKernel kern;
  LoraDotsKernel dots;
  int64_t ldu;
  size_t esize, ws_per;
};

// Shrink + mix of one item: u[t, r] = (A[r, :] · x[t]) · coef(t, r) for its rows and tokens.
void shrink_item(const Call& c, const LoraPlan::Shrink& it, int tid) {
  const LoraMixParams& p = c.p;
  const LoraSite& s = p.sites[it.site];
  const LoraBlock& blk = s.blocks[it.block];
  const int64_t nt_blk = blk.n_toks, nrows = it.r1 - it.r0;
  float* u0 = p.u + c.pl.u_off[size_t(it.site)];
  if (nt_blk < kLoraPackMinTokens) {
    LoraDotsParams d;
    d.A = static_cast<const uint8_t*>(blk.A) + size_t((it.r0 - blk.r0) * p.d_in) * c.esize;
    d.dtype = p.dtype;
    d.K = p.d_in;
    d.rows = nrows;
    d.x = p.x;
    d.ldx = p.ldx;
    d.toks = blk.toks;
    d.n_toks = nt_blk;
    d.u = u0 + it.r0;
    d.ldu = c.ldu;
    c.dots(d);
  } else {
    uint8_t* ws = c.pl.panel_ws.data() + c.ws_per * size_t(tid);
    if (p.dtype == DType::BF16)
      pack_panel(static_cast<const uint16_t*>(blk.A), it.r0 - blk.r0, nrows, p.d_in, reinterpret_cast<uint16_t*>(ws));
    else
      pack_panel(static_cast<const float*>(blk.A), it.r0 - blk.r0, nrows, p.d_in, reinterpret_cast<float*>(ws));
    MatmulParams m;
    m.x = p.x;
    m.ldx = p.ldx;
    m.w = ws;
    m.w_dtype = p.dtype;
    m.y = u0 + it.r0;
    m.ldy = c.ldu;
    m.T = nt_blk;
    m.N = nrows;
    m.K = p.d_in;
    m.x_rows = blk.toks;
    m.y_rows = blk.toks;
    c.kern(m, 0, 1);
  }
  for (int64_t ti = 0; ti < blk.n_toks; ++ti) {
    const int32_t t = blk.toks[ti];
    float* u = u0 + int64_t(t) * c.ldu;
    for (int64_t r = it.r0; r < it.r1; ++r) u[r] *= row_coef(p, s, t, r);
  }
}

// Expand: y_s[t] += B_s[:, ranges] · u[t, ranges] over output panels [p0, p1), for the
// site's expand calls [call0, call1).
void expand_panels(const Call& c, int site, int64_t p0, int64_t p1, int64_t call0, int64_t call1) {
  const LoraMixParams& p = c.p;
  const LoraPlan& pl = c.pl;
  const LoraSite& s = p.sites[site];
  for (int64_t ci = call0; ci < call1; ++ci) {
    const LoraPlan::Expand& e = pl.expand[size_t(ci)];
    MatmulParams m;
    m.x = p.u + pl.u_off[size_t(site)];
    m.ldx = c.ldu;
    m.w = nullptr;  // every range has its block's matrix (k_range_w)
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
    c.kern(m, p0, p1);
  }
}

// A whole site: its shrink items, then its expand over all its output panels.
void site_work(const Call& c, int si, int tid) {
  const LoraPlan& pl = c.pl;
  for (int64_t i = pl.site_shrink[size_t(si)]; i < pl.site_shrink[size_t(si) + 1]; ++i)
    shrink_item(c, pl.shrink[size_t(i)], tid);
  if (pl.site_expand[size_t(si)] < pl.site_expand[size_t(si) + 1])
    expand_panels(c, si, 0, (c.p.sites[si].d_out + kPanel - 1) / kPanel, pl.site_expand[size_t(si)],
                  pl.site_expand[size_t(si) + 1]);
}

}  // namespace

void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool) {
  ATMOE_ASSERT(p.plan != nullptr && p.n_sites >= 0);
  LoraPlan& pl = *p.plan;
  build_plan(p, pl);
  if (pl.shrink.empty()) return;
  Call c{p, pl, panel_kernel(), lora_dots_kernel(), 0, dtype_size(p.dtype), 0};
  c.ws_per = size_t(kPanel * p.d_in) * c.esize;
  if (pl.panel_ws.size() < c.ws_per * size_t(pool.size())) pl.panel_ws.assign(c.ws_per * size_t(pool.size()), 0);
  const int n_sites = p.n_sites;
  pl.u_off.resize(size_t(n_sites));
  for (int i = 0; i < n_sites; ++i) {
    pl.u_off[size_t(i)] = c.ldu;
    c.ldu += p.sites[i].R;
  }
  // Each site's shrink items and expand calls (the plan lists them site by site).
  pl.site_shrink.assign(size_t(n_sites) + 1, 0);
  pl.site_expand.assign(size_t(n_sites) + 1, 0);
  for (const auto& it : pl.shrink) ++pl.site_shrink[size_t(it.site) + 1];
  for (const auto& e : pl.expand) ++pl.site_expand[size_t(e.site) + 1];
  for (int i = 0; i < n_sites; ++i) {
    pl.site_shrink[size_t(i) + 1] += pl.site_shrink[size_t(i)];
    pl.site_expand[size_t(i) + 1] += pl.site_expand[size_t(i)];
  }
  int64_t work = 0;  // multiply-adds
  for (const auto& it : pl.shrink) work += (it.r1 - it.r0) * p.sites[it.site].blocks[it.block].n_toks * p.d_in;
  for (const auto& e : pl.expand) {
    int64_t k = 0;
    for (int64_t r = e.range0; r < e.range1; r += 2) k += pl.ranges[size_t(r + 1)] - pl.ranges[size_t(r)];
    work += k * (e.tok1 - e.tok0) * p.sites[e.site].d_out;
  }

  // The parallel regions' state, reached through one pointer: a lambda that captures only
  // it fits std::function's inline storage (no allocation per call).
  struct Region {
    const Call* c;
    std::atomic<int> next_site{0}, arrived{0};
    std::atomic<int64_t> next_shrink{0}, next_chunk{0};
  } rg;
  rg.c = &c;
  if (work < kLoraDecodeMacs) {
    // Decode-sized: the time is the rank rows' DRAM latency, not arithmetic. Sites are
    // independent (their u and y columns are apart): with several sites and threads, each
    // thread takes whole sites and prefetches its own weights (two cores keep twice the
    // misses in flight), with no barrier; a thread that joins late takes less.
    if (n_sites > 1 && pool.size() > 1) {
      pool.run_dynamic([r = &rg](int tid, int) {
        for (int si; (si = r->next_site.fetch_add(1, std::memory_order_relaxed)) < r->c->p.n_sites;) {
          prefetch_sites(r->c->p, si, si + 1);
          site_work(*r->c, si, tid);
        }
      });
    } else {
      prefetch_sites(p, 0, n_sites);
      for (int si = 0; si < n_sites; ++si) site_work(c, si, 0);
    }
    return;
  }

  // Larger calls: one parallel region, shrink items from a shared counter, a barrier, then
  // expand work in chunks of output panels (a few per thread).
  auto& chunks = pl.chunks;
  chunks.clear();
  {
    int64_t total = 0;
    for (int i = 0; i < n_sites; ++i) total += (p.sites[i].d_out + kPanel - 1) / kPanel;
    const int64_t per = std::max<int64_t>(1, total / (4 * int64_t(pool.size())));
    for (int i = 0; i < n_sites; ++i) {
      const int64_t c0 = pl.site_expand[size_t(i)], c1 = pl.site_expand[size_t(i) + 1];
      if (c0 == c1) continue;
      const int64_t np = (p.sites[i].d_out + kPanel - 1) / kPanel;
      for (int64_t a = 0; a < np; a += per) chunks.push_back({i, a, std::min(np, a + per), c0, c1});
    }
  }
  pool.run([r = &rg](int tid, int nt) {
    const LoraPlan& pl = r->c->pl;
    const int64_t n_shrink = int64_t(pl.shrink.size()), n_chunks = int64_t(pl.chunks.size());
    for (int64_t i; (i = r->next_shrink.fetch_add(1, std::memory_order_relaxed)) < n_shrink;)
      shrink_item(*r->c, pl.shrink[size_t(i)], tid);
    ThreadPool::barrier(r->arrived, nt);
    for (int64_t i; (i = r->next_chunk.fetch_add(1, std::memory_order_relaxed)) < n_chunks;) {
      const LoraPlan::Chunk& ch = pl.chunks[size_t(i)];
      expand_panels(*r->c, ch.site, ch.p0, ch.p1, ch.call0, ch.call1);
    }
  });
}

// B_b[n][r - r0] of a block (packed panels, matmul.h).
static double block_b_at(const LoraBlock& blk, DType dt, int64_t n, int64_t r) {
  return double(packed_at(blk.B, dt, blk.r1 - blk.r0, n, r - blk.r0));
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
          for (int64_t k = 0; k < p.d_in; ++k) {  // A_b row-major
            const size_t at = size_t((r - blk.r0) * p.d_in + k);
            const double a = p.dtype == DType::BF16 ? double(bf16_to_f32(static_cast<const uint16_t*>(blk.A)[at]))
                                                    : double(static_cast<const float*>(blk.A)[at]);
            acc += double(p.x[t * p.ldx + k]) * a;
          }
          u[size_t(r - blk.r0)] = acc * double(row_coef(p, s, t, r));
        }
        for (int64_t n = 0; n < s.d_out; ++n) {
          double acc = 0;
          for (int64_t r = blk.r0; r < blk.r1; ++r)
            acc += block_b_at(blk, p.dtype, n, r) * u[size_t(r - blk.r0)];
          s.y[t * s.ldy + n] = float(double(s.y[t * s.ldy + n]) + acc);
        }
      }
    }
  }
}

}  // namespace atmoe::cpu
