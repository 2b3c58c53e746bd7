#include "kernels/cpu/lora.h"

#include <vector>

#include "common/error.h"
#include "kernels/cpu/matmul.h"
#include "kernels/thread_pool.h"

namespace atmoe::cpu {

void lora_mix_apply(const LoraMixParams& p, ThreadPool& pool) {
  if (p.T == 0 || p.active.empty()) return;
  std::vector<std::pair<int64_t, int64_t>> panels;
  std::vector<int64_t> kr;
  for (auto [a, b] : p.active) {
    ATMOE_ASSERT(a % kPanel == 0 && b % kPanel == 0 && a < b && b <= p.R);
    panels.emplace_back(a / kPanel, b / kPanel);
    kr.push_back(a);
    kr.push_back(b);
  }
  // Shrink: u[:, active] = x · A[active]^T.
  MatmulParams s;
  s.x = p.x;
  s.ldx = p.ldx;
  s.w = p.A;
  s.w_dtype = DType::F32;
  s.y = p.u;
  s.ldy = p.R;
  s.T = p.T;
  s.N = p.R;
  s.K = p.d_in;
  matmul_panels(s, panels, pool);
  // Mix: a per-token row scale (routing weight × LoRA scale × λ).
  for (int64_t t = 0; t < p.T; ++t)
    for (auto [a, b] : p.active)
      for (int64_t r = a; r < b; ++r) p.u[t * p.R + r] *= p.mix[t * p.R + r];
  // Expand: y += u[:, active] · B[:, active]^T.
  MatmulParams e;
  e.x = p.u;
  e.ldx = p.R;
  e.w = p.B;
  e.w_dtype = DType::F32;
  e.y = p.y;
  e.ldy = p.ldy;
  e.T = p.T;
  e.N = p.d_out;
  e.K = p.R;
  e.accumulate = true;
  e.k_ranges = kr.data();
  e.n_k_ranges = int64_t(p.active.size());
  matmul_simd(e, pool);
}

void lora_mix_apply_ref(const LoraMixParams& p) {
  for (int64_t t = 0; t < p.T; ++t) {
    std::vector<double> u(size_t(p.R), 0.0);
    for (auto [a, b] : p.active)
      for (int64_t r = a; r < b; ++r) {
        double s = 0;
        for (int64_t k = 0; k < p.d_in; ++k) s += double(p.x[t * p.ldx + k]) * packed_at(p.A, DType::F32, p.d_in, r, k);
        u[size_t(r)] = s * p.mix[t * p.R + r];
      }
    for (int64_t n = 0; n < p.d_out; ++n) {
      double s = 0;
      for (auto [a, b] : p.active)
        for (int64_t r = a; r < b; ++r) s += double(packed_at(p.B, DType::F32, p.R, n, r)) * u[size_t(r)];
      p.y[t * p.ldy + n] = float(double(p.y[t * p.ldy + n]) + s);
    }
  }
}

}  // namespace atmoe::cpu
