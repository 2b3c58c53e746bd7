#include "kernels/cpu/lora.h"

#include <atomic>
#include <vector>

#include "common/error.h"
#include "kernels/cpu/matmul.h"
#include "kernels/thread_pool.h"

namespace atmoe::cpu {

static inline float row_coef(const LoraMixParams& p, int64_t t, int64_t r) {
  const int32_t e = p.row_expert[r];
  return e < 0 ? 0.f : p.coef[t * p.ldc + e] * p.row_scale[r];
}

void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool) {
  ATMOE_ASSERT(p.items != nullptr);
  auto& items = *p.items;  // (block, panel) shrink work
  items.clear();
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    const LoraBlock& blk = p.blocks[b];
    ATMOE_ASSERT(blk.r0 % kPanel == 0 && blk.r1 % kPanel == 0 && blk.r0 <= blk.r1 && blk.r1 <= p.R);
    if (!blk.toks.empty())
      for (int64_t pn = blk.r0 / kPanel; pn < blk.r1 / kPanel; ++pn) items.emplace_back(size_t(b), pn);
  }
  if (items.empty()) return;
  const PanelKernel kern = panel_kernel();
  const int64_t n_items = int64_t(items.size()), out_panels = (p.d_out + kPanel - 1) / kPanel;
  std::atomic<int> arrived{0};
  pool.run([&](int tid, int nt) {
    // Shrink + mix: u[t, panel] = (A[panel] · x[t]) · coef(t, row) for the block's tokens.
    for (int64_t i = tid; i < n_items; i += nt) {
      auto [b, pn] = items[size_t(i)];
      const LoraBlock& blk = p.blocks[b];
      MatmulParams s;
      s.x = p.x;
      s.ldx = p.ldx;
      s.w = p.A;
      s.w_dtype = p.dtype;
      s.y = p.u;
      s.ldy = p.R;
      s.T = int64_t(blk.toks.size());
      s.N = p.R;
      s.K = p.d_in;
      s.x_rows = blk.toks.data();
      s.y_rows = blk.toks.data();
      kern(s, pn, pn + 1);
      for (int32_t t : blk.toks) {
        float* u = p.u + int64_t(t) * p.R;
        for (int64_t r = pn * kPanel; r < (pn + 1) * kPanel; ++r) u[r] *= row_coef(p, t, r);
      }
    }
    ThreadPool::barrier(arrived, nt);
    // Expand: y[t] += B[:, block] · u[t, block], block by block, over this thread's output panels.
    const int64_t per = (out_panels + nt - 1) / nt, p0 = tid * per, p1 = std::min(out_panels, p0 + per);
    if (p0 >= p1) return;
    for (int64_t b = 0; b < p.n_blocks; ++b) {
      const LoraBlock& blk = p.blocks[b];
      if (blk.toks.empty() || blk.r0 == blk.r1) continue;
      const int64_t kr[2] = {blk.r0, blk.r1};
      MatmulParams e;
      e.x = p.u;
      e.ldx = p.R;
      e.w = p.B;
      e.w_dtype = p.dtype;
      e.y = p.y;
      e.ldy = p.ldy;
      e.T = int64_t(blk.toks.size());
      e.N = p.d_out;
      e.K = p.R;
      e.accumulate = true;
      e.k_ranges = kr;
      e.n_k_ranges = 1;
      e.x_rows = blk.toks.data();
      e.y_rows = blk.toks.data();
      kern(e, p0, p1);
    }
  });
}

void lora_mix_apply_ref(const LoraMixParams& p) {
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    const LoraBlock& blk = p.blocks[b];
    for (int32_t t : blk.toks) {
      std::vector<double> u(static_cast<size_t>(blk.r1 - blk.r0), 0.0);
      for (int64_t r = blk.r0; r < blk.r1; ++r) {
        double s = 0;
        for (int64_t k = 0; k < p.d_in; ++k) s += double(p.x[t * p.ldx + k]) * packed_at(p.A, p.dtype, p.d_in, r, k);
        u[size_t(r - blk.r0)] = s * double(row_coef(p, t, r));
      }
      for (int64_t n = 0; n < p.d_out; ++n) {
        double s = 0;
        for (int64_t r = blk.r0; r < blk.r1; ++r) s += double(packed_at(p.B, p.dtype, p.R, n, r)) * u[size_t(r - blk.r0)];
        p.y[t * p.ldy + n] = float(double(p.y[t * p.ldy + n]) + s);
      }
    }
  }
}

}  // namespace atmoe::cpu
