#include "kernels/cpu/lora.h"

#include <vector>

#include "common/error.h"
#include "kernels/cpu/matmul.h"
#include "kernels/thread_pool.h"

namespace atmoe::cpu {

void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool) {
  if (p.T == 0 || p.active.empty()) return;
  // Tokens that use each active range (nonzero mix somewhere in it).
  ATMOE_ASSERT(p.scratch != nullptr);
  const size_t nb = p.active.size();
  auto& toks = p.scratch->toks;
  if (toks.size() < nb) toks.resize(nb);
  for (size_t b = 0; b < nb; ++b) {
    auto [r0, r1] = p.active[b];
    ATMOE_ASSERT(r0 % kPanel == 0 && r1 % kPanel == 0 && r0 < r1 && r1 <= p.R);
    toks[b].clear();
    for (int64_t t = 0; t < p.T; ++t) {
      const float* m = p.mix + t * p.R;
      bool used = false;
      for (int64_t r = r0; r < r1 && !used; ++r) used = m[r] != 0.f;
      if (used) toks[b].push_back(int32_t(t));
    }
  }
  // Shrink: u[t, block] = A[block] · x[t] for the block's tokens; items = (block, panel).
  auto& items = p.scratch->items;
  items.clear();
  for (size_t b = 0; b < nb; ++b)
    if (!toks[b].empty())
      for (int64_t pn = p.active[b].first / kPanel; pn < p.active[b].second / kPanel; ++pn) items.emplace_back(b, pn);
  if (items.empty()) return;
  const PanelKernel kern = panel_kernel();
  pool.parallel_for(int64_t(items.size()), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      auto [b, pn] = items[size_t(i)];
      MatmulParams s;
      s.x = p.x;
      s.ldx = p.ldx;
      s.w = p.A;
      s.w_dtype = p.dtype;
      s.y = p.u;
      s.ldy = p.R;
      s.T = int64_t(toks[b].size());
      s.N = p.R;
      s.K = p.d_in;
      s.x_rows = toks[b].data();
      s.y_rows = toks[b].data();
      kern(s, pn, pn + 1);
      // Mix: the per-token row scale (routing weight × LoRA scale × λ) of this panel's rows.
      for (int32_t t : toks[b]) {
        float* u = p.u + int64_t(t) * p.R;
        const float* m = p.mix + int64_t(t) * p.R;
        for (int64_t r = pn * kPanel; r < (pn + 1) * kPanel; ++r) u[r] *= m[r];
      }
    }
  });
  // Expand: y[t] += B[:, block] · u[t, block], block by block, over output panels.
  pool.parallel_for((p.d_out + kPanel - 1) / kPanel, [&](int64_t p0, int64_t p1) {
    for (size_t b = 0; b < nb; ++b) {
      if (toks[b].empty()) continue;
      const int64_t kr[2] = {p.active[b].first, p.active[b].second};
      MatmulParams e;
      e.x = p.u;
      e.ldx = p.R;
      e.w = p.B;
      e.w_dtype = p.dtype;
      e.y = p.y;
      e.ldy = p.ldy;
      e.T = int64_t(toks[b].size());
      e.N = p.d_out;
      e.K = p.R;
      e.accumulate = true;
      e.k_ranges = kr;
      e.n_k_ranges = 1;
      e.x_rows = toks[b].data();
      e.y_rows = toks[b].data();
      kern(e, p0, p1);
    }
  });
}

void lora_mix_apply_ref(const LoraMixParams& p) {
  for (int64_t t = 0; t < p.T; ++t) {
    std::vector<double> u(static_cast<size_t>(p.R), 0.0);
    for (auto [a, b] : p.active)
      for (int64_t r = a; r < b; ++r) {
        double s = 0;
        for (int64_t k = 0; k < p.d_in; ++k) s += double(p.x[t * p.ldx + k]) * packed_at(p.A, p.dtype, p.d_in, r, k);
        u[size_t(r)] = s * p.mix[t * p.R + r];
      }
    for (int64_t n = 0; n < p.d_out; ++n) {
      double s = 0;
      for (auto [a, b] : p.active)
        for (int64_t r = a; r < b; ++r) s += double(packed_at(p.B, p.dtype, p.R, n, r)) * u[size_t(r)];
      p.y[t * p.ldy + n] = float(double(p.y[t * p.ldy + n]) + s);
    }
  }
}

}  // namespace atmoe::cpu
