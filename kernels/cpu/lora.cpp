#include "kernels/cpu/lora.h"

#include <algorithm>
#include <atomic>
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

// Shrink items: every packed panel of A overlapped by a block with tokens, with the union
// of those blocks' tokens. Expand calls: per site, runs of consecutive blocks with the
// same token list merged into one call over several k ranges.
static void build_plan(const LoraMixParams& p, LoraPlan& pl) {
  pl.shrink.clear();
  pl.expand.clear();
  pl.toks.clear();
  pl.ranges.clear();
  pl.mark.assign(size_t(p.T), -1);
  int64_t stamp = 0;
  for (int si = 0; si < p.n_sites; ++si) {
    const LoraSite& s = p.sites[si];
    int64_t prev_end = 0;
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      ATMOE_ASSERT(blk.r0 >= prev_end && blk.r0 <= blk.r1 && blk.r1 <= s.R);
      prev_end = blk.r1;
    }
    // Shrink: walk the panels that blocks with tokens touch.
    int64_t first = 0;  // first block that may overlap the current panel
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      if (blk.toks.empty() || blk.r0 == blk.r1) continue;
      for (int64_t pn = blk.r0 / kPanel; pn <= (blk.r1 - 1) / kPanel; ++pn) {
        if (!pl.shrink.empty() && pl.shrink.back().site == si && pl.shrink.back().panel == pn) continue;  // done
        const int64_t lo = pn * kPanel, hi = lo + kPanel;
        LoraPlan::Shrink it{si, pn, int64_t(pl.toks.size()), 0};
        ++stamp;
        while (first < s.n_blocks && s.blocks[first].r1 <= lo) ++first;
        for (int64_t c = first; c < s.n_blocks && s.blocks[c].r0 < hi; ++c) {
          const LoraBlock& o = s.blocks[c];
          if (o.r0 == o.r1) continue;
          for (int32_t t : o.toks)
            if (pl.mark[size_t(t)] != stamp) {
              pl.mark[size_t(t)] = stamp;
              pl.toks.push_back(t);
            }
        }
        it.tok1 = int64_t(pl.toks.size());
        pl.shrink.push_back(it);
      }
    }
    // Expand calls.
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      if (blk.toks.empty() || blk.r0 == blk.r1) continue;
      bool merged = false;
      if (!pl.expand.empty() && pl.expand.back().site == si) {
        LoraPlan::Expand& e = pl.expand.back();
        const int64_t n = e.tok1 - e.tok0;
        if (n == int64_t(blk.toks.size()) && std::equal(blk.toks.begin(), blk.toks.end(), pl.toks.begin() + e.tok0)) {
          if (pl.ranges.back() == blk.r0) {
            pl.ranges.back() = blk.r1;
          } else {
            pl.ranges.push_back(blk.r0);
            pl.ranges.push_back(blk.r1);
            e.range1 += 2;
          }
          merged = true;
        }
      }
      if (!merged) {
        LoraPlan::Expand e{si, int64_t(pl.ranges.size()), int64_t(pl.ranges.size()) + 2, int64_t(pl.toks.size()), 0};
        pl.ranges.push_back(blk.r0);
        pl.ranges.push_back(blk.r1);
        pl.toks.insert(pl.toks.end(), blk.toks.begin(), blk.toks.end());
        e.tok1 = int64_t(pl.toks.size());
        pl.expand.push_back(e);
      }
    }
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
  pool.run([&](int, int nt) {
    // Shrink + mix: u[t, panel] = (A[panel] · x[t]) · coef(t, row) for the panel's tokens.
    for (int64_t i; (i = next_shrink.fetch_add(1, std::memory_order_relaxed)) < n_shrink;) {
      const LoraPlan::Shrink& it = pl.shrink[size_t(i)];
      const LoraSite& s = p.sites[it.site];
      const int32_t* toks = pl.toks.data() + it.tok0;
      MatmulParams m;
      m.x = p.x;
      m.ldx = p.ldx;
      m.w = s.A;
      m.w_dtype = p.dtype;
      m.y = p.u + u_off[it.site];
      m.ldy = ldu;
      m.T = it.tok1 - it.tok0;
      m.N = s.R;
      m.K = p.d_in;
      m.x_rows = toks;
      m.y_rows = toks;
      kern(m, it.panel, it.panel + 1);
      const int64_t r1 = std::min(s.R, (it.panel + 1) * kPanel);
      for (int64_t j = 0; j < m.T; ++j) {
        const int64_t t = toks[j];
        float* u = p.u + t * ldu + u_off[it.site];
        for (int64_t r = it.panel * kPanel; r < r1; ++r) u[r] *= row_coef(p, s, t, r);
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
        m.x_rows = pl.toks.data() + e.tok0;
        m.y_rows = m.x_rows;
        kern(m, ch.p0, ch.p1);
      }
    }
  });
}

void lora_mix_apply_ref(const LoraMixParams& p) {
  for (int si = 0; si < p.n_sites; ++si) {
    const LoraSite& s = p.sites[si];
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      for (int32_t t : blk.toks) {
        std::vector<double> u(static_cast<size_t>(blk.r1 - blk.r0), 0.0);
        for (int64_t r = blk.r0; r < blk.r1; ++r) {
          double acc = 0;
          for (int64_t k = 0; k < p.d_in; ++k)
            acc += double(p.x[t * p.ldx + k]) * packed_at(s.A, p.dtype, p.d_in, r, k);
          u[size_t(r - blk.r0)] = acc * double(row_coef(p, s, t, r));
        }
        for (int64_t n = 0; n < s.d_out; ++n) {
          double acc = 0;
          for (int64_t r = blk.r0; r < blk.r1; ++r)
            acc += double(packed_at(s.B, p.dtype, s.R, n, r)) * u[size_t(r - blk.r0)];
          s.y[t * s.ldy + n] = float(double(s.y[t * s.ldy + n]) + acc);
        }
      }
    }
  }
}

}  // namespace atmoe::cpu
