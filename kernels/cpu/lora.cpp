#include "kernels/cpu/lora.h"

#include <algorithm>
#include <atomic>
#include <cstring>
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

int64_t lora_mix_macs(const ops::LoraMixParams& p) {
  int64_t macs = 0;
  for (int si = 0; si < p.n_sites; ++si) {
    const LoraSite& s = p.sites[si];
    for (int64_t b = 0; b < s.n_blocks; ++b)
      macs += (s.blocks[b].r1 - s.blocks[b].r0) * s.blocks[b].n_toks * (p.d_in + s.d_out);
  }
  return macs;
}

// Shrink items: every block with tokens, in pieces of at most 32 rows. Expand calls: per
// site, runs of consecutive blocks with the same token list merged into one call over
// several k ranges.
static void build_plan(const LoraMixParams& p, LoraWork& pl) {
  pl.shrink.clear();
  pl.expand.clear();
  pl.toks.clear();
  pl.ranges.clear();
  pl.range_block.clear();
  for (int si = 0; si < p.n_sites; ++si) {
    const LoraSite& s = p.sites[si];
    int64_t prev_end = 0;
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      ATMOE_ASSERT(blk.r0 >= prev_end && blk.r0 <= blk.r1 && blk.r1 <= s.R);
      prev_end = blk.r1;
      if (blk.n_toks == 0 || blk.r0 == blk.r1) continue;
      for (int64_t r = blk.r0; r < blk.r1; r += kPanel) pl.shrink.push_back({si, b, r, std::min(blk.r1, r + kPanel)});
      pl.range_block.push_back({si, b});
      bool merged = false;
      if (!pl.expand.empty() && pl.expand.back().site == si) {
        LoraWork::Expand& e = pl.expand.back();
        const int64_t n = e.tok1 - e.tok0;
        if (n == blk.n_toks && std::equal(blk.toks, blk.toks + blk.n_toks, pl.toks.begin() + e.tok0)) {
          pl.ranges.push_back(blk.r0);
          pl.ranges.push_back(blk.r1);
          e.range1 += 2;
          merged = true;
        }
      }
      if (!merged) {
        LoraWork::Expand e{si, int64_t(pl.ranges.size()), int64_t(pl.ranges.size()) + 2, int64_t(pl.toks.size()), 0, b};
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

// The units of a few-token call (LoraWork): per site, union-find over its blocks with tokens
// (two blocks that share a token are one unit: the token's expand sums both into one y row),
// then each unit's shrink items and expand calls.
static int32_t find(std::vector<int32_t>& parent, int32_t b) {
  while (parent[size_t(b)] != b) b = parent[size_t(b)] = parent[size_t(parent[size_t(b)])];
  return b;
}

static void build_units(const LoraMixParams& p, LoraWork& pl) {
  pl.unit_site.clear();
  pl.site_block0.assign(size_t(p.n_sites) + 1, 0);
  for (int si = 0; si < p.n_sites; ++si)
    pl.site_block0[size_t(si) + 1] = pl.site_block0[size_t(si)] + p.sites[si].n_blocks;
  pl.block_unit.assign(size_t(pl.site_block0.back()), -1);
  for (int si = 0; si < p.n_sites; ++si) {
    const LoraSite& s = p.sites[si];
    pl.parent.resize(size_t(s.n_blocks));
    for (int64_t b = 0; b < s.n_blocks; ++b) pl.parent[size_t(b)] = int32_t(b);
    pl.tok_owner.assign(size_t(p.T), -1);
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      if (blk.n_toks == 0 || blk.r0 == blk.r1) continue;
      for (int64_t j = 0; j < blk.n_toks; ++j) {
        int32_t& o = pl.tok_owner[size_t(blk.toks[j])];
        if (o < 0) {
          o = int32_t(b);
        } else {
          const int32_t ra = find(pl.parent, o), rb = find(pl.parent, int32_t(b));
          if (ra != rb) pl.parent[size_t(std::max(ra, rb))] = std::min(ra, rb);
        }
      }
    }
    int64_t* bu = pl.block_unit.data() + pl.site_block0[size_t(si)];
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      if (blk.n_toks == 0 || blk.r0 == blk.r1) continue;
      const int32_t r = find(pl.parent, int32_t(b));
      if (bu[r] < 0) {
        bu[r] = int64_t(pl.unit_site.size());
        pl.unit_site.push_back(int32_t(si));
      }
      bu[b] = bu[r];
    }
  }
  const size_t nu = pl.unit_site.size();
  const auto csr = [&](std::vector<int64_t>& off, std::vector<int64_t>& items, int64_t n, auto unit_of) {
    off.assign(nu + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++off[size_t(unit_of(i)) + 1];
    for (size_t u = 0; u < nu; ++u) off[u + 1] += off[u];
    items.resize(size_t(n));
    pl.cursor.assign(nu, 0);
    for (int64_t i = 0; i < n; ++i) {
      const size_t u = size_t(unit_of(i));
      items[size_t(off[u] + pl.cursor[u]++)] = i;
    }
  };
  csr(pl.unit_shrink_off, pl.unit_shrink, int64_t(pl.shrink.size()), [&](int64_t i) {
    const LoraWork::Shrink& it = pl.shrink[size_t(i)];
    return pl.block_unit[size_t(pl.site_block0[size_t(it.site)] + it.block)];
  });
  csr(pl.unit_expand_off, pl.unit_expand, int64_t(pl.expand.size()), [&](int64_t i) {
    const LoraWork::Expand& e = pl.expand[size_t(i)];
    return pl.block_unit[size_t(pl.site_block0[size_t(e.site)] + e.block0)];
  });
}

namespace {

// One call's state shared by the work items.
struct Call {
  const LoraMixParams& p;
  const LoraWork& pl;
  PanelKernel kern;
  LoraDotsKernel dots;
  int64_t ldu;
  size_t esize, ws_per;
  uint8_t* panel_ws;  // ws_per bytes per thread
};

// Shrink + mix of one item: u[t, r] = (A[r, :] · x[t]) · coef(t, r) for its rows and tokens.
void shrink_item(const Call& c, const LoraWork::Shrink& it, int tid) {
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
    uint8_t* ws = c.panel_ws + c.ws_per * size_t(tid);
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

// Expand call ci: y_s[t] += B_s[:, ranges] · u[t, ranges] over output panels [p0, p1).
void expand_call(const Call& c, int64_t ci, int64_t p0, int64_t p1) {
  const LoraMixParams& p = c.p;
  const LoraWork& pl = c.pl;
  const LoraWork::Expand& e = pl.expand[size_t(ci)];
  const int site = e.site;
  const LoraSite& s = p.sites[site];
  {
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

// A whole unit: its shrink items, then its expand calls over all the site's output panels.
// The kernels prefetch the rank rows ahead of their loads (a prefetch of the whole unit up
// front measured no better than none: docs/performance.md).
void unit_work(const Call& c, int64_t u, int tid) {
  const LoraWork& pl = c.pl;
  const int si = pl.unit_site[size_t(u)];
  for (int64_t i = pl.unit_shrink_off[size_t(u)]; i < pl.unit_shrink_off[size_t(u) + 1]; ++i)
    shrink_item(c, pl.shrink[size_t(pl.unit_shrink[size_t(i)])], tid);
  const int64_t np = (c.p.sites[si].d_out + kPanel - 1) / kPanel;
  for (int64_t i = pl.unit_expand_off[size_t(u)]; i < pl.unit_expand_off[size_t(u) + 1]; ++i)
    expand_call(c, pl.unit_expand[size_t(i)], 0, np);
}

}  // namespace

// This call's structure: everything the work lists depend on (not the weights, x, coef, y,
// strides or dtype, read from p on every call). Layout: n_sites, T, d_in, n_threads; per
// site R, d_out, n_blocks; per block r0, r1, n (n = n_toks, 0 for a block without rows),
// then its n tokens. Every variable-length run follows its count, so the flat key decodes
// one way: two structures with equal keys are the same.
static void structure_key(const LoraMixParams& p, int n_threads, std::vector<int64_t>& k) {
  k.clear();
  k.insert(k.end(), {int64_t(p.n_sites), p.T, p.d_in, int64_t(n_threads)});
  for (int si = 0; si < p.n_sites; ++si) {
    const LoraSite& s = p.sites[si];
    k.insert(k.end(), {s.R, s.d_out, s.n_blocks});
    for (int64_t b = 0; b < s.n_blocks; ++b) {
      const LoraBlock& blk = s.blocks[b];
      const int64_t n = blk.r0 < blk.r1 ? blk.n_toks : 0;  // an empty block's list is not read
      k.insert(k.end(), {blk.r0, blk.r1, n});
      k.insert(k.end(), blk.toks, blk.toks + n);
    }
  }
}

static uint64_t key_hash(const std::vector<int64_t>& k) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ k.size();
  for (int64_t v : k) h = (h ^ uint64_t(v)) * 0x100000001b3ull;
  return h;
}

// The work lists of a structure seen for the first time: shrink items and expand calls,
// u's layout, and the units (decode-sized) or the expand chunks (larger calls).
static void build_work(const LoraMixParams& p, int n_threads, LoraWork& pl) {
  build_plan(p, pl);
  const int n_sites = p.n_sites;
  pl.u_off.resize(size_t(n_sites));
  pl.ldu = 0;
  for (int i = 0; i < n_sites; ++i) {
    pl.u_off[size_t(i)] = pl.ldu;
    pl.ldu += p.sites[i].R;
  }
  int64_t work = 0, max_toks = 0;  // multiply-adds; the most tokens of a block
  for (const auto& it : pl.shrink) {
    const int64_t nt = p.sites[it.site].blocks[it.block].n_toks;
    work += (it.r1 - it.r0) * nt * p.d_in;
    max_toks = std::max(max_toks, nt);
  }
  for (const auto& e : pl.expand) {
    int64_t k = 0;
    for (int64_t r = e.range0; r < e.range1; r += 2) k += pl.ranges[size_t(r + 1)] - pl.ranges[size_t(r)];
    work += k * (e.tok1 - e.tok0) * p.sites[e.site].d_out;
  }
  // Decode-sized, or a decode batch: the time is the rank rows' DRAM latency, not
  // arithmetic. Units are independent (their u and y entries are apart): each thread takes
  // whole units (two cores keep twice the misses in flight; the kernels prefetch ahead
  // within each unit), with no barrier; a thread that joins late takes less.
  pl.units = work < kLoraDecodeMacs || max_toks < kLoraPackMinTokens;
  pl.unit_site.clear();
  if (pl.units) {
    build_units(p, pl);
    return;
  }
  // Larger calls: each site's expand calls (the plan lists them site by site), in chunks of
  // output panels (a few per thread).
  pl.site_expand.assign(size_t(n_sites) + 1, 0);
  for (const auto& e : pl.expand) ++pl.site_expand[size_t(e.site) + 1];
  for (int i = 0; i < n_sites; ++i) pl.site_expand[size_t(i) + 1] += pl.site_expand[size_t(i)];
  pl.chunks.clear();
  int64_t total = 0;
  for (int i = 0; i < n_sites; ++i) total += (p.sites[i].d_out + kPanel - 1) / kPanel;
  const int64_t per = std::max<int64_t>(1, total / (4 * int64_t(n_threads)));
  for (int i = 0; i < n_sites; ++i) {
    const int64_t c0 = pl.site_expand[size_t(i)], c1 = pl.site_expand[size_t(i) + 1];
    if (c0 == c1) continue;
    const int64_t np = (p.sites[i].d_out + kPanel - 1) / kPanel;
    for (int64_t a = 0; a < np; a += per) pl.chunks.push_back({i, a, std::min(np, a + per), c0, c1});
  }
}

// The work lists of this call: a slot built for the same structure, or the next slot built
// now. Either way the blocks' B pointers are read from p (they differ between layers).
static const LoraWork& find_work(const LoraMixParams& p, int n_threads, LoraPlan& plan) {
  structure_key(p, n_threads, plan.key);
  const uint64_t h = key_hash(plan.key);
  LoraWork* w = nullptr;
  for (int i = 1; i <= LoraPlan::kSlots; ++i) {
    const int j = (plan.at + i) % LoraPlan::kSlots;
    if (plan.hash[j] == h && plan.slot[j].key == plan.key) {
      w = &plan.slot[j];
      plan.at = j;
      break;
    }
  }
  if (w) {
    ++plan.hits;
  } else {
    ++plan.misses;
    plan.at = plan.next;
    w = &plan.slot[plan.next];
    plan.next = (plan.next + 1) % LoraPlan::kSlots;
    w->key.clear();  // not valid until built (build_plan asserts on bad input)
    build_work(p, n_threads, *w);
    w->key.swap(plan.key);
    plan.hash[plan.at] = h;
  }
  w->range_w.resize(w->range_block.size());
  for (size_t i = 0; i < w->range_block.size(); ++i) {
    const LoraBlock& blk = p.sites[w->range_block[i].first].blocks[w->range_block[i].second];
    ATMOE_ASSERT(blk.A != nullptr && blk.B != nullptr);
    w->range_w[i] = blk.B;
  }
  plan.last = w;
  return *w;
}

// The call's shared state (c.panel_ws: n_threads slices of the plan's workspace).
static Call make_call(const LoraMixParams& p, const LoraWork& pl, int n_threads) {
  Call c{p, pl, panel_kernel(), lora_dots_kernel(), pl.ldu, dtype_size(p.dtype), 0, nullptr};
  c.ws_per = size_t(kPanel * p.d_in) * c.esize;
  std::vector<uint8_t>& ws = p.plan->panel_ws;
  if (ws.size() < c.ws_per * size_t(n_threads)) ws.assign(c.ws_per * size_t(n_threads), 0);
  c.panel_ws = ws.data();
  return c;
}

void lora_mix_apply_alone(const LoraMixParams& p, int n_threads, int tid) {
  ATMOE_ASSERT(p.plan != nullptr && p.n_sites >= 0 && tid >= 0 && tid < n_threads);
  const LoraWork& pl = find_work(p, n_threads, *p.plan);
  if (pl.shrink.empty()) return;
  const Call c = make_call(p, pl, n_threads);
  if (pl.units) {
    for (int64_t u = 0; u < int64_t(pl.unit_site.size()); ++u) unit_work(c, u, tid);
    return;
  }
  for (const auto& it : pl.shrink) shrink_item(c, it, tid);  // then the expand: no barrier alone
  for (const auto& ch : pl.chunks)
    for (int64_t ci = ch.call0; ci < ch.call1; ++ci) expand_call(c, ci, ch.p0, ch.p1);
}

void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool) {
  ATMOE_ASSERT(p.plan != nullptr && p.n_sites >= 0);
  const LoraWork& pl = find_work(p, pool.size(), *p.plan);
  if (pl.shrink.empty()) return;
  const Call c = make_call(p, pl, pool.size());

  // The parallel regions' state, reached through one pointer: a lambda that captures only
  // it fits std::function's inline storage (no allocation per call).
  struct Region {
    const Call* c;
    std::atomic<int64_t> next_unit{0}, next_shrink{0}, next_chunk{0};
    std::atomic<int> arrived{0};
  } rg;
  rg.c = &c;
  if (pl.units) {
    const int64_t n_units = int64_t(pl.unit_site.size());
    if (n_units > 1 && pool.size() > 1) {
      pool.run_dynamic([r = &rg](int tid, int) {
        const int64_t n = int64_t(r->c->pl.unit_site.size());
        for (int64_t u; (u = r->next_unit.fetch_add(1, std::memory_order_relaxed)) < n;) unit_work(*r->c, u, tid);
      });
    } else {
      for (int64_t u = 0; u < n_units; ++u) unit_work(c, u, 0);
    }
    return;
  }

  // Larger calls: one parallel region, shrink items from a shared counter, a barrier, then
  // expand work in chunks of output panels.
  pool.run([r = &rg](int tid, int nt) {
    const LoraWork& pl = r->c->pl;
    const int64_t n_shrink = int64_t(pl.shrink.size()), n_chunks = int64_t(pl.chunks.size());
    for (int64_t i; (i = r->next_shrink.fetch_add(1, std::memory_order_relaxed)) < n_shrink;)
      shrink_item(*r->c, pl.shrink[size_t(i)], tid);
    ThreadPool::barrier(r->arrived, nt);
    for (int64_t i; (i = r->next_chunk.fetch_add(1, std::memory_order_relaxed)) < n_chunks;) {
      const LoraWork::Chunk& ch = pl.chunks[size_t(i)];
      for (int64_t ci = ch.call0; ci < ch.call1; ++ci) expand_call(*r->c, ci, ch.p0, ch.p1);
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
