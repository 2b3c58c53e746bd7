// What is particular to the CPU kernels: the packed panel layout and the matmul on every
// ISA this CPU has (through the dispatcher, which ctest also runs on the OpenBLAS path, and
// each kernel directly), each fast path against its `_ref` specification, and the host
// sampler (random draws, penalties, log-probabilities).
// Every op behind the Backend interface, on every backend, is in test_backend_ops.cpp.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/lora.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/sampling.h"
#include "kernels/cpu/silu_mul.h"
#include "kernels/cpu/softmax.h"
#include "kernels/cpu/trex.h"
#include "kernels/thread_pool.h"
#include "tests/unit/check.h"
#include "tests/unit/op_reference.h"

namespace atmoe::test {
namespace {

ThreadPool& pool2() {
  static ThreadPool p(2);
  return p;
}

struct MatmulCase {
  int64_t T, N, K;
};
// T < 4 with several panels: the few-token tiles take 4 (T = 1) or 2 (T = 2, 3) panels at a
// time, then fewer; the last panel partly past N.
const MatmulCase kMatmulCases[] = {{1, 1, 1},     {1, 37, 576}, {3, 130, 77},  {4, 64, 1536},  {16, 67, 100},
                                   {7, 17, 15},   {13, 48, 33}, {31, 96, 64},  {33, 300, 576}, {64, 259, 100},
                                   {40, 1100, 8}, {37, 40, 50}, {38, 33, 257}, {35, 64, 96},   {1, 300, 20},
                                   {1, 97, 576},  {2, 170, 33}, {3, 100, 9}};

using Kernel = void (*)(const cpu::MatmulParams&, int64_t, int64_t);

void run_matmul_case(const MatmulCase& c, DType wdt, bool bias, bool acc, Kernel direct, std::mt19937_64& rng) {
  auto x = randn(size_t(c.T * c.K), rng);
  auto wf = randn(size_t(c.N * c.K), rng, 0.5f);
  // Packed panels; the reference reads them back through packed_at, and an
  // independent check below compares packed_at with the row-major source.
  std::vector<float> pf(cpu::packed_elems(c.N, c.K));
  std::vector<uint16_t> pb(pf.size());
  cpu::pack_weights(wf.data(), c.N, c.K, DType::F32, pf.data());
  cpu::pack_weights(wf.data(), c.N, c.K, DType::BF16, pb.data());
  for (int64_t n = 0; n < c.N; n += 7)
    for (int64_t k = 0; k < c.K; k += 5) {
      ASSERT_EQ(cpu::packed_at(pf.data(), DType::F32, c.K, n, k), wf[size_t(n * c.K + k)]);
      ASSERT_EQ(cpu::packed_at(pb.data(), DType::BF16, c.K, n, k), bf16_to_f32(f32_to_bf16(wf[size_t(n * c.K + k)])));
    }
  auto b = randn(size_t(c.N), rng);
  auto y0 = randn(size_t(c.T * c.N), rng);  // prior contents for accumulate
  cpu::MatmulParams p;
  p.x = x.data();
  p.ldx = c.K;
  p.w = wdt == DType::F32 ? static_cast<const void*>(pf.data()) : pb.data();
  p.w_dtype = wdt;
  p.bias = bias ? b.data() : nullptr;
  p.ldy = c.N;
  p.T = c.T;
  p.N = c.N;
  p.K = c.K;
  p.accumulate = acc;
  std::vector<float> ref = y0;
  p.y = ref.data();
  cpu::matmul_ref(p);
  std::vector<float> got = acc ? y0 : poisoned(y0.size());
  p.y = got.data();
  if (direct) {
    direct(p, 0, (c.N + cpu::kPanel - 1) / cpu::kPanel);
  } else {
    std::vector<float> ws(static_cast<size_t>(cpu::matmul_workspace_floats(p)) + 1);
    cpu::matmul(p, ws.data(), pool2());
  }
  // sgemm and the SIMD kernels sum in a different order than the double reference:
  // the tolerance scales with the magnitude of the terms (sqrt(K) * |x||w|).
  Tol t{1e-5 * std::sqrt(double(c.K)) * 4, 1e-5};
  EXPECT_TRUE(all_close(got.data(), ref.data(), got.size(), t))
      << "T=" << c.T << " N=" << c.N << " K=" << c.K << " w=" << dtype_name(wdt) << " bias=" << bias << " acc=" << acc;
}

TEST(Matmul, DispatcherMatchesReference) {
  // ctest also runs this with ATMOE_PREFILL_GEMM=blas (tests/CMakeLists.txt: the OpenBLAS path).
  std::mt19937_64 rng(test_seed());
  for (const auto& c : kMatmulCases)
    for (DType dt : {DType::F32, DType::BF16})
      for (bool bias : {false, true})
        for (bool acc : {false, true}) run_matmul_case(c, dt, bias, acc, nullptr, rng);
}

TEST(Matmul, EveryIsaKernelMatchesReference) {
  std::mt19937_64 rng(test_seed() + 1);
  std::map<std::string, Kernel> ks{{"scalar", cpu::gemm_panels_scalar}};
  if (cpu::best_isa() >= cpu::Isa::Avx2) ks["avx2"] = cpu::gemm_panels_avx2;
  if (cpu::best_isa() >= cpu::Isa::Avx512) ks["avx512"] = cpu::gemm_panels_avx512;
  for (auto& [name, k] : ks) {
    SCOPED_TRACE(name);
    for (const auto& c : kMatmulCases)
      for (DType dt : {DType::F32, DType::BF16})
        for (bool acc : {false, true}) run_matmul_case(c, dt, true, acc, k, rng);
  }
}

// The knob ctest sets for Matmul.GemvPrefetch_{on,off} (tests/CMakeLists.txt) reaches the
// kernels' switch; unset, it follows the CPU's vendor.
TEST(Matmul, GemvPrefetchFollowsItsKnob) {
  const char* v = std::getenv("ATMOE_GEMV_PREFETCH");
  const std::string knob = v ? v : "auto";
  __builtin_cpu_init();
  const bool want = knob == "auto" ? bool(__builtin_cpu_is("intel")) : knob == "on";
  EXPECT_EQ(cpu::gemv_prefetch(), want) << "ATMOE_GEMV_PREFETCH=" << knob;
}

// The CPU's fast paths against its own specification (the `_ref` functions: plain loops,
// double accumulation, CONVENTIONS.md 2) and independent float64 transcriptions, on the
// CPU's private layouts (packed panels, block-packed LoRA B). The same ops on every backend,
// through the Backend interface, are in test_backend_ops.cpp.
TEST(CpuSpecRmsNorm, MatchesReferenceAndAliases) {
  std::mt19937_64 rng(test_seed() + 2);
  for (auto [T, D] : {std::pair<int64_t, int64_t>{1, 1}, {3, 576}, {17, 64}, {2, 4097}}) {
    auto x = randn(size_t(T * D), rng, 3.f);
    auto w = randn(size_t(D), rng);
    std::vector<float> ref(x.size()), got = poisoned(x.size());
    cpu::rmsnorm_ref({x.data(), D, w.data(), ref.data(), D, T, D, 1e-5f});
    cpu::rmsnorm({x.data(), D, w.data(), got.data(), D, T, D, 1e-5f}, &pool2());
    EXPECT_TRUE(all_close(got.data(), ref.data(), got.size(), kF32));
    cpu::rmsnorm({x.data(), D, w.data(), x.data(), D, T, D, 1e-5f}, &pool2());  // in place
    EXPECT_TRUE(all_close(x.data(), ref.data(), x.size(), kF32));
  }
}

TEST(CpuSpecRope, MatchesReferenceBothStyles) {
  std::mt19937_64 rng(test_seed() + 3);
  const int64_t T = 7, H = 3, D = 64, ld = H * D + 5;
  std::vector<int32_t> pos{0, 1, 2, 100, 4095, 8191, 131071};
  std::vector<float> inv(D / 2);
  for (int64_t i = 0; i < D / 2; ++i) inv[size_t(i)] = float(std::pow(100000.0, -2.0 * double(i) / double(D)));
  for (bool neox : {true, false}) {
    auto x = randn(size_t(T * ld), rng);
    auto ref = x;
    cpu::rope_ref({ref.data(), ld, T, H, D, pos.data(), inv.data(), neox});
    cpu::rope({x.data(), ld, T, H, D, pos.data(), inv.data(), neox});
    EXPECT_TRUE(all_close(x.data(), ref.data(), x.size(), kF32)) << "neox=" << neox;
  }
  // Independent property: position 0 is the identity; each rotated pair keeps its norm.
  auto x = randn(size_t(ld), rng), y = x;
  int32_t p0 = 0;
  cpu::rope({y.data(), ld, 1, H, D, &p0, inv.data(), true});
  EXPECT_TRUE(all_close(y.data(), x.data(), y.size(), kF32));
  int32_t p1 = 77;
  cpu::rope({y.data(), ld, 1, H, D, &p1, inv.data(), false});
  for (int64_t i = 0; i < D / 2; ++i) {
    double a = std::hypot(x[size_t(2 * i)], x[size_t(2 * i + 1)]), b = std::hypot(y[size_t(2 * i)], y[size_t(2 * i + 1)]);
    EXPECT_NEAR(a, b, 1e-5 * (1 + a));
  }
}

TEST(CpuSpecAttention, PackedSequencesWithGqaMatchReference) {
  std::mt19937_64 rng(test_seed() + 4);
  const int64_t Hq = 6, Hkv = 2, D = 32, ldq = Hq * D + 8, ldkv = Hkv * D;
  // A fresh prefill of 5, a decode step at position 40, a chunk of 3 at 10..12, and two
  // segments long enough for the GEMM path: a fresh prefill of 37 and a chunk of 20 at 40..59.
  struct S {
    int64_t ctx, T;
  };
  std::vector<S> ss{{5, 5}, {41, 1}, {13, 3}, {37, 37}, {60, 20}};
  int64_t total = 0, max_ctx = 0;
  for (auto& s : ss) total += s.T, max_ctx = std::max(max_ctx, s.ctx);
  auto q = randn(size_t(total * ldq), rng);
  std::vector<std::vector<float>> ks, vs;
  std::vector<std::vector<int32_t>> pos;
  std::vector<cpu::AttentionSeq> seqs;
  int64_t t0 = 0;
  for (auto& s : ss) {
    ks.push_back(randn(size_t(s.ctx * ldkv), rng));
    vs.push_back(randn(size_t(s.ctx * ldkv), rng));
    std::vector<int32_t> p;
    for (int64_t j = 0; j < s.T; ++j) p.push_back(int32_t(s.ctx - s.T + j));
    pos.push_back(p);
  }
  for (size_t i = 0; i < ss.size(); ++i) {
    seqs.push_back({t0, ss[i].T, ks[i].data(), vs[i].data(), pos[i].data()});
    t0 += ss[i].T;
  }
  cpu::AttentionParams p;
  p.q = q.data();
  p.ldq = ldq;
  p.ldo = Hq * D;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.scale = 1.f / std::sqrt(float(D));
  p.seqs = seqs.data();
  p.n_seqs = int64_t(seqs.size());
  p.max_ctx = max_ctx;
  std::vector<float> ref(static_cast<size_t>(total * Hq * D)), got = poisoned(ref.size());
  p.out = ref.data();
  cpu::attention_ref(p);
  p.out = got.data();
  std::vector<float> ws(size_t(cpu::attention_workspace_floats(p, pool2().size())));
  cpu::attention(p, ws.data(), pool2());
  EXPECT_TRUE(all_close(got.data(), ref.data(), got.size(), kF32));
}

// plan: the work-list cache to use (default: a fresh one).
// rot: with spread, token t uses group (t + rot) mod G.
static void check_lora_mix(int64_t T, uint64_t salt, bool spread = false, cpu::LoraPlan* plan = nullptr,
                           int64_t rot = 0) {
  // Two sites fed by one input (as q and k are), experts of ranks 3, 8, 5 | 16 | 7 | 1 | 30 |
  // 24, 16 in six groups, stacked without padding (the last block has 40 rows: two shrink
  // items, the second at row 32 of its block). Group 2 has
  // nonzero coefficients but is not listed for any token: it must not reach y; inside a
  // block only the listed tokens are computed. u is poisoned: a row the expand reads but
  // the shrink did not write would turn y into NaN.
  SCOPED_TRACE("T = " + std::to_string(T));
  std::mt19937_64 rng(test_seed() + 8 + salt);
  const int64_t din = 70;
  const std::vector<int64_t> douts{45, 70};
  const std::vector<std::vector<int64_t>> groups{{3, 8, 5}, {16}, {7}, {1}, {30}, {24, 16}};
  struct Ex {
    int64_t row0, r, group;
    std::vector<float> A, B;
  };
  struct SiteData {
    std::vector<Ex> ex;
    std::vector<cpu::LoraBlock> blk;
    std::vector<std::vector<int32_t>> toks;  // the blocks' token lists (LoraBlock points into them)
    std::vector<int32_t> row_col;
    std::vector<float> row_scale;
    std::vector<float> Ap, Bp;
    std::vector<uint16_t> Ab, Bb;
    std::vector<float> y0, got, viaref, want, gb, rb;
    std::vector<int64_t> boff;  // each block's B offset (elements)
    int64_t R = 0;
  };
  int64_t n_ex = 0;
  for (const auto& g : groups) n_ex += int64_t(g.size());
  std::vector<float> coef(static_cast<size_t>(T * n_ex)), scale(static_cast<size_t>(n_ex));
  for (auto& v : scale) v = std::uniform_real_distribution<float>(0.5f, 2.f)(rng);
  for (auto& v : coef) v = rng() % 4 == 0 ? 0.f : std::uniform_real_distribution<float>(-1, 1)(rng);
  if (spread) {  // token t uses group t mod G only (a decode batch spread over the groups)
    int64_t c0 = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = c0; c < c0 + int64_t(groups[g].size()); ++c)
          if ((t + rot) % int64_t(groups.size()) != int64_t(g)) coef[size_t(t * n_ex + c)] = 0.f;
      for (int64_t t = 0; t < T; ++t)  // and uses it: a block lists exactly its group's tokens
        if ((t + rot) % int64_t(groups.size()) == int64_t(g)) coef[size_t(t * n_ex + c0)] = 0.75f;
      c0 += int64_t(groups[g].size());
    }
  }
  auto x = randn(size_t(T * din), rng);
  std::vector<SiteData> sd(douts.size());
  std::vector<cpu::LoraSite> sites(douts.size());
  for (size_t si = 0; si < douts.size(); ++si) {
    SiteData& d = sd[si];
    const int64_t dout = douts[si];
    int64_t col = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      cpu::LoraBlock b;
      d.toks.emplace_back();
      b.r0 = d.R;
      const int64_t c0 = col;
      for (int64_t r : groups[g]) {
        d.ex.push_back({d.R, r, int64_t(g), randn(size_t(r * din), rng), randn(size_t(dout * r), rng)});
        for (int64_t i = 0; i < r; ++i) {
          d.row_col.push_back(int32_t(col));
          d.row_scale.push_back(scale[size_t(col)]);
        }
        d.R += r;
        ++col;
      }
      b.r1 = d.R;
      if (g != 2)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t c = c0; c < col; ++c)
            if (coef[size_t(t * n_ex + c)] != 0) {
              d.toks.back().push_back(int32_t(t));
              break;
            }
      d.blk.push_back(b);
    }
    for (size_t g = 0; g < d.blk.size(); ++g) {
      d.blk[g].toks = d.toks[g].data();
      d.blk[g].n_toks = int64_t(d.toks[g].size());
    }
    std::vector<float> A(size_t(d.R * din)), B(size_t(dout * d.R));
    for (const auto& e : d.ex)
      for (int64_t i = 0; i < e.r; ++i) {
        for (int64_t k = 0; k < din; ++k) A[size_t((e.row0 + i) * din + k)] = e.A[size_t(i * din + k)];
        for (int64_t n = 0; n < dout; ++n) B[size_t(n * d.R + e.row0 + i)] = e.B[size_t(n * e.r + i)];
      }
    // One buffer per site for A (row-major) and for B (each block a packed-panel matrix of
    // its own, blocks in *reverse* order): the blocks' pointers say where their weights are.
    d.Ap = A;
    d.Bp.assign(cpu::packed_elems(dout, d.R), 0.f);
    d.Bb.assign(cpu::packed_elems(dout, d.R), 0);
    d.Ab.resize(A.size());
    f32_to_bf16_n(A.data(), d.Ab.data(), A.size());
    int64_t off = 0;
    for (size_t g = d.blk.size(); g-- > 0;) {
      const auto& b = d.blk[g];
      std::vector<float> Bblk(size_t(dout * (b.r1 - b.r0)));  // row-major [dout, r1 - r0]
      for (int64_t n = 0; n < dout; ++n)
        for (int64_t r = b.r0; r < b.r1; ++r) Bblk[size_t(n * (b.r1 - b.r0) + r - b.r0)] = B[size_t(n * d.R + r)];
      cpu::pack_weights(Bblk.data(), dout, b.r1 - b.r0, DType::F32, d.Bp.data() + off);
      cpu::pack_weights(Bblk.data(), dout, b.r1 - b.r0, DType::BF16, d.Bb.data() + off);
      d.boff.push_back(off);
      off += int64_t(cpu::packed_elems(dout, b.r1 - b.r0));
    }
    std::reverse(d.boff.begin(), d.boff.end());
    d.y0 = randn(size_t(T * dout), rng);
    // Independent: per expert, in float64, from the unpacked matrices.
    d.want.resize(d.y0.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < dout; ++n) {
        double acc = d.y0[size_t(t * dout + n)];
        int64_t c = 0;
        for (const auto& e : d.ex) {
          if (e.group != 2)
            for (int64_t i = 0; i < e.r; ++i) {
              double ax = 0;
              for (int64_t k = 0; k < din; ++k) ax += double(e.A[size_t(i * din + k)]) * x[size_t(t * din + k)];
              acc += double(coef[size_t(t * n_ex + c)]) * scale[size_t(c)] * double(e.B[size_t(n * e.r + i)]) * ax;
            }
          ++c;
        }
        d.want[size_t(t * dout + n)] = float(acc);
      }
    cpu::LoraSite& s = sites[si];
    s.R = d.R;
    s.d_out = dout;
    s.row_col = d.row_col.data();
    s.row_scale = d.row_scale.data();
    s.blocks = d.blk.data();
    s.n_blocks = int64_t(d.blk.size());
    s.ldy = dout;
  }
  cpu::LoraPlan own_plan;
  if (!plan) plan = &own_plan;
  cpu::LoraMixParams p;
  p.x = x.data();
  p.ldx = din;
  p.T = T;
  p.d_in = din;
  p.coef = coef.data();
  p.ldc = n_ex;
  p.sites = sites.data();
  p.n_sites = int(sites.size());
  p.plan = plan;
  std::vector<float> u = poisoned(size_t(cpu::lora_workspace_floats(p)));
  p.u = u.data();
  auto run = [&](DType dt, std::vector<float> SiteData::*out, bool ref) {
    p.dtype = dt;
    u = poisoned(u.size());  // nothing left by the previous run
    p.u = u.data();
    for (size_t si = 0; si < sites.size(); ++si) {
      sd[si].*out = sd[si].y0;
      for (size_t g = 0; g < sd[si].blk.size(); ++g) {
        cpu::LoraBlock& b = sd[si].blk[g];
        b.A = dt == DType::F32 ? static_cast<const void*>(sd[si].Ap.data() + b.r0 * din)
                               : sd[si].Ab.data() + b.r0 * din;
        b.B = dt == DType::F32 ? static_cast<const void*>(sd[si].Bp.data() + sd[si].boff[g])
                               : sd[si].Bb.data() + sd[si].boff[g];
      }
      sites[si].y = (sd[si].*out).data();
    }
    if (ref) cpu::lora_mix_apply_ref(p);
    else cpu::lora_mix_apply(p, pool2());
  };
  run(DType::F32, &SiteData::got, false);
  // The path taken and its units (lora.h): decode batches (every block under
  // kLoraPackMinTokens tokens, or little work) run in units; two blocks of a site that share
  // a token must be one unit (their expand sums into the same y row on one thread), and a
  // spread batch gets one unit per (site, listed group).
  const bool units = T < 13 || spread;
  const cpu::LoraWork& work = *plan->last;
  ASSERT_EQ(work.units, units);
  ASSERT_EQ(!work.unit_site.empty(), units);
  if (units) {
    for (size_t si = 0; si < sites.size(); ++si)
      for (size_t a = 0; a < sd[si].blk.size(); ++a)
        for (size_t b = a + 1; b < sd[si].blk.size(); ++b) {
          const auto& ta = sd[si].toks[a];
          const auto& tb = sd[si].toks[b];
          const bool share = std::any_of(ta.begin(), ta.end(),
                                         [&](int32_t t) { return std::find(tb.begin(), tb.end(), t) != tb.end(); });
          if (share) {
            EXPECT_EQ(work.block_unit[size_t(work.site_block0[si]) + a],
                      work.block_unit[size_t(work.site_block0[si]) + b])
                << "site " << si << " blocks " << a << ", " << b;
          }
        }
    if (spread) {
      // No two blocks share a token: one unit per block listed for a token (not every
      // (site, group): group 2 is listed for no token).
      size_t listed = 0;
      for (const auto& d : sd)
        for (const auto& b : d.blk) listed += b.n_toks > 0;
      EXPECT_EQ(listed, sites.size() * std::min<size_t>(groups.size() - 1, size_t(T)));
      EXPECT_EQ(work.unit_site.size(), listed);
    }
  }
  run(DType::F32, &SiteData::viaref, true);
  run(DType::BF16, &SiteData::gb, false);
  run(DType::BF16, &SiteData::rb, true);
  Tol tol{1e-4, 1e-5};
  for (auto& d : sd) {
    EXPECT_TRUE(all_close(d.got.data(), d.want.data(), d.want.size(), tol));
    EXPECT_TRUE(all_close(d.viaref.data(), d.want.data(), d.want.size(), tol));
    // bf16 stacks (bf16 models): the kernel against the reference on the same bf16 values.
    EXPECT_TRUE(all_close(d.gb.data(), d.rb.data(), d.rb.size(), tol));
    double num = 0, den = 0;  // bf16 rounding of A and B: close to the f32 result as a whole
    for (size_t i = 0; i < d.want.size(); ++i) {
      num += (d.gb[i] - d.want[i]) * (d.gb[i] - d.want[i]);
      den += (d.want[i] - d.y0[i]) * (d.want[i] - d.y0[i]);
    }
    EXPECT_LT(std::sqrt(num / den), 1e-2);
  }
}

TEST(CpuSpecLoraMix, ShrinkMixExpandMatchesPerExpertFloat64) {
  // 200 tokens: one parallel region over both threads, blocks with many tokens (rows packed
  // into a panel, the GEMM kernel); 13: the parallel region, most blocks packed, some with
  // fewer than kLoraPackMinTokens tokens (lora_dots); 6, 3 and 1: decode-sized calls (below
  // kLoraDecodeMacs: units, here one per site as the tokens share groups; lora_dots in tiles
  // of 4 or 2 tokens, then one). ctest also runs this on the AVX2 and scalar kernels (ATMOE_FORCE_ISA).
  check_lora_mix(200, 3);
  check_lora_mix(13, 0);
  check_lora_mix(6, 4);
  check_lora_mix(3, 1);
  check_lora_mix(1, 2);
  // A decode batch whose tokens each use one group: one unit per (site, group), taken by
  // both threads with no barrier (lora.h); 18 tokens: three per group.
  check_lora_mix(18, 5, /*spread=*/true);
}

TEST(CpuSpecLoraDots, ATokensSumsDoNotDependOnItsBatch) {
  // lora.h: every (row, token) sum is formed in the same order whatever the other rows and
  // tokens of the call are. A token alone, and the same token inside calls of 2 to 7 tokens
  // (tiles of 4, 2 and 1 tokens, of 8, 4, 2 and 1 rows), give the same bits; rows 1 to 11,
  // K with and without a tail past the vectors, f32 and bf16, every ISA ctest forces.
  std::mt19937_64 rng(test_seed() + 12);
  const auto dots = cpu::lora_dots_kernel();
  for (DType dt : {DType::F32, DType::BF16})
    for (int64_t K : {64, 77, 300})
      for (int64_t rows : {1, 3, 8, 11}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " K " + std::to_string(K) + " rows " + std::to_string(rows));
        const auto Af = randn(size_t(rows * K), rng, 0.3f);
        std::vector<uint16_t> Ab(Af.size());
        for (size_t i = 0; i < Af.size(); ++i) Ab[i] = f32_to_bf16(Af[i]);
        const int64_t n_rows_x = 9;
        const auto x = randn(size_t(n_rows_x * K), rng);
        cpu::LoraDotsParams p;
        p.A = dt == DType::F32 ? static_cast<const void*>(Af.data()) : Ab.data();
        p.dtype = dt;
        p.K = K;
        p.rows = rows;
        p.x = x.data();
        p.ldx = K;
        p.ldu = rows;
        std::vector<int32_t> toks{4};
        std::vector<float> alone = poisoned(size_t(n_rows_x * rows));
        p.toks = toks.data();
        p.n_toks = 1;
        p.u = alone.data();
        dots(p);
        for (int n = 2; n <= 7; ++n)
          for (int at = 0; at < n; ++at) {  // token 4 at every place of the call
            toks.clear();
            for (int j = 1; j < n; ++j) toks.push_back(int32_t((4 + 2 * j) % n_rows_x));
            toks.insert(toks.begin() + at, 4);
            std::vector<float> u = poisoned(size_t(n_rows_x * rows));
            p.toks = toks.data();
            p.n_toks = n;
            p.u = u.data();
            dots(p);
            EXPECT_EQ(std::memcmp(u.data() + 4 * rows, alone.data() + 4 * rows, size_t(rows) * sizeof(float)), 0)
                << n << " tokens, token 4 at " << at;
          }
      }
}

TEST(CpuSpecLoraMix, WorkListsReusedOnlyForTheSameStructure) {
  // One work-list cache (LoraPlan) across calls, as a backend keeps it. Each check runs the
  // kernel twice on one structure, f32 then bf16 weights elsewhere: the second finds the
  // lists and must read every block's weight pointers again. The two spread calls differ
  // only in which tokens each block lists (rot): reusing one's lists for the other computes
  // the wrong tokens.
  cpu::LoraPlan plan;
  const auto pass = [&] {
    check_lora_mix(1, 2, false, &plan);
    check_lora_mix(3, 1, false, &plan);
    check_lora_mix(18, 5, true, &plan);
    check_lora_mix(18, 5, true, &plan, /*rot=*/1);
    check_lora_mix(6, 4, false, &plan);
    check_lora_mix(13, 0, false, &plan);
  };
  pass();
  ASSERT_LE(plan.misses, 6);
  EXPECT_GE(plan.hits, 6);
  const int64_t misses = plan.misses, hits = plan.hits;
  pass();  // every structure is still cached
  EXPECT_EQ(plan.misses, misses);
  EXPECT_EQ(plan.hits, hits + 12);
  // kSlots new structures (no other call has these T) push the oldest out: it is built again.
  for (int64_t T = 20; T < 20 + cpu::LoraPlan::kSlots; ++T) check_lora_mix(T, 9, false, &plan);
  EXPECT_EQ(plan.misses, misses + cpu::LoraPlan::kSlots);
  check_lora_mix(1, 2, false, &plan);
  EXPECT_EQ(plan.misses, misses + cpu::LoraPlan::kSlots + 1);
}

TEST(CpuSpecTrex, RankOneExpertsMatchFloat64Transcription) {
  std::mt19937_64 rng(test_seed() + 9);
  for (bool diagonal : {false, true}) {
    const int64_t din = 40, dout = 33, r1 = diagonal ? 6 : 4, r2 = diagonal ? 6 : 3, E = diagonal ? 6 : 12;
    const int64_t Tall = 9, R = cpu::packed_rows(r1 + E);
    auto A = randn(size_t(r1 * din), rng, 0.3f), Wr = randn(size_t(E * din), rng, 0.3f), B = randn(size_t(dout * r2), rng);
    std::vector<float> aw(static_cast<size_t>(R * din), 0.f);
    std::copy(A.begin(), A.end(), aw.begin());
    std::copy(Wr.begin(), Wr.end(), aw.begin() + r1 * din);
    std::vector<float> awp(cpu::packed_elems(R, din)), bp(cpu::packed_elems(dout, r2));
    cpu::pack_weights(aw.data(), R, din, DType::F32, awp.data());
    cpu::pack_weights(B.data(), dout, r2, DType::F32, bp.data());
    auto x = randn(size_t(Tall * din), rng);
    std::vector<int32_t> rows{0, 2, 3, 7, 8};  // tokens 1, 4, 5, 6 do not route (their y is untouched)
    const int64_t T = int64_t(rows.size());
    auto sv = randn(size_t(T * E), rng);
    std::vector<float> om(static_cast<size_t>(T));
    for (auto& o : om) o = std::uniform_real_distribution<float>(0.f, 1.f)(rng);
    auto y0 = randn(size_t(Tall * dout), rng);
    cpu::TrexParams p;
    p.x = x.data();
    p.ldx = din;
    p.AW = awp.data();
    p.B = bp.data();
    p.R = R;
    p.T = T;
    p.d_in = din;
    p.d_out = dout;
    p.r1 = r1;
    p.r2 = r2;
    p.E = E;
    p.diagonal = diagonal;
    p.rows = rows.data();
    p.s = sv.data();
    p.omega = om.data();
    p.gate = 0.8f;
    std::vector<float> ws(static_cast<size_t>(cpu::trex_workspace_floats(p)));
    p.ws = ws.data();
    p.ldy = dout;
    auto got = y0, viaref = y0;
    p.y = got.data();
    cpu::trex_apply(p, pool2());
    p.y = viaref.data();
    cpu::trex_apply_ref(p);
    // Independent transcription from the unpacked matrices.
    std::vector<float> want = y0;
    for (int64_t j = 0; j < T; ++j)
      trex_row_f64(x.data() + rows[size_t(j)] * din, A.data(), Wr.data(), B.data(), din, dout, r1, r2, E, diagonal,
                   om[size_t(j)], sv.data() + j * E, 0.8, want.data() + rows[size_t(j)] * dout);
    EXPECT_TRUE(all_close(got.data(), want.data(), want.size(), {1e-4, 1e-5})) << "diagonal=" << diagonal;
    EXPECT_TRUE(all_close(viaref.data(), want.data(), want.size(), {1e-4, 1e-5})) << "diagonal=" << diagonal;
  }
}

TEST(CpuSpecSiluMul, MatchesReference) {
  std::mt19937_64 rng(test_seed() + 5);
  const int64_t T = 9, F = 1000;
  auto gu = randn(size_t(T * 2 * F), rng, 4.f);
  std::vector<float> ref(static_cast<size_t>(T * F)), got = poisoned(ref.size());
  cpu::silu_mul_ref({gu.data(), 2 * F, gu.data() + F, 2 * F, ref.data(), F, T, F});
  cpu::silu_mul({gu.data(), 2 * F, gu.data() + F, 2 * F, got.data(), F, T, F}, &pool2());
  EXPECT_TRUE(all_close(got.data(), ref.data(), got.size(), kF32));
}

TEST(CpuSpecSoftmax, MatchesReferenceWithMaskedEntries) {
  std::mt19937_64 rng(test_seed() + 6);
  auto x = randn(4 * 50, rng, 10.f);
  x[3] = -INFINITY;
  for (int i = 100; i < 150; ++i) x[size_t(i)] = -INFINITY;  // a fully masked row
  auto ref = x;
  cpu::softmax_rows_ref(ref.data(), 4, 50, 0.5f);
  cpu::softmax_rows(x.data(), 4, 50, 0.5f);
  EXPECT_TRUE(all_close(x.data(), ref.data(), x.size(), kF32));
  EXPECT_EQ(x[3], 0.f);
  EXPECT_EQ(x[120], 0.f);
  double s = 0;
  for (int i = 0; i < 50; ++i) s += x[size_t(i)];
  EXPECT_NEAR(s, 1.0, 1e-6);
}

TEST(Sampling, GreedyTopKTopPAndDistribution) {
  std::mt19937_64 rng(test_seed() + 7);
  std::vector<std::pair<float, int32_t>> scratch;
  std::vector<float> lg{0.1f, 2.0f, -1.f, 2.0f, 1.5f};
  EXPECT_EQ(cpu::argmax(lg.data(), 5), 1);  // lowest id on ties
  EXPECT_EQ(cpu::sample(lg.data(), 5, {0.f, 0, 1.f}, rng, scratch), 1);
  EXPECT_EQ(cpu::sample(lg.data(), 5, {1.f, 1, 1.f}, rng, scratch), 1);
  // top_k = 2 -> only ids 1 and 3 (the two 2.0 logits) can appear.
  for (int i = 0; i < 200; ++i) {
    int32_t t = cpu::sample(lg.data(), 5, {1.f, 2, 1.f}, rng, scratch);
    EXPECT_TRUE(t == 1 || t == 3);
  }
  // Empirical frequencies follow softmax(logits / T).
  const float T = 0.7f;
  std::vector<double> p(5);
  double z = 0;
  for (int i = 0; i < 5; ++i) z += (p[size_t(i)] = std::exp(double(lg[size_t(i)]) / T));
  for (auto& v : p) v /= z;
  std::vector<int> cnt(5);
  const int n = 40000;
  for (int i = 0; i < n; ++i) cnt[size_t(cpu::sample(lg.data(), 5, {T, 0, 1.f}, rng, scratch))]++;
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(cnt[size_t(i)] / double(n), p[size_t(i)], 5 * std::sqrt(p[size_t(i)] / n) + 1e-3);
  // top_p = 0.5: the smallest prefix reaching half the mass: ids {1, 3} here.
  for (int i = 0; i < 200; ++i) {
    int32_t t = cpu::sample(lg.data(), 5, {1.f, 0, 0.5f}, rng, scratch);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
}

// min_p keeps tokens with p >= min_p * p_max (after temperature), then the draw follows the
// renormalised softmax over them.
TEST(Sampling, MinPAgainstFloat64) {
  std::mt19937_64 rng(test_seed() + 11);
  std::vector<std::pair<float, int32_t>> scratch;
  std::vector<float> lg{0.0f, 1.0f, 2.0f, 2.2f, -3.f, 1.9f};
  const float T = 0.8f, min_p = 0.5f;
  std::vector<double> p(lg.size());
  double pmax = 0, z = 0;
  for (size_t i = 0; i < lg.size(); ++i) pmax = std::max(pmax, p[i] = std::exp(double(lg[i]) / T));
  for (size_t i = 0; i < lg.size(); ++i) {
    if (p[i] < min_p * pmax) p[i] = 0;
    z += p[i];
  }
  for (auto& v : p) v /= z;
  ASSERT_EQ(p[0], 0.0);
  ASSERT_GT(p[5], 0.0);
  std::vector<int> cnt(lg.size());
  const int n = 40000;
  cpu::SamplingParams sp{T, 0, 1.f, min_p};
  for (int i = 0; i < n; ++i) cnt[size_t(cpu::sample(lg.data(), int64_t(lg.size()), sp, rng, scratch))]++;
  for (size_t i = 0; i < lg.size(); ++i)
    EXPECT_NEAR(cnt[i] / double(n), p[i], 5 * std::sqrt(p[i] / n) + 1e-3) << i;
  // With top_k 2 after min_p: ids 3 and 2 only.
  sp.top_k = 2;
  for (int i = 0; i < 300; ++i) {
    const int32_t t = cpu::sample(lg.data(), int64_t(lg.size()), sp, rng, scratch);
    EXPECT_TRUE(t == 2 || t == 3) << t;
  }
}

// OpenAI's presence/frequency penalties on output tokens, the HF repetition penalty on
// prompt and output tokens, against the formulas in float64 on fresh random logits.
TEST(Sampling, PenaltiesMatchTheirDefinitions) {
  std::mt19937_64 rng(test_seed() + 12);
  std::normal_distribution<float> nd(0.f, 3.f);
  const int64_t V = 257;
  std::vector<float> lg(static_cast<size_t>(V));
  for (auto& x : lg) x = nd(rng);
  std::vector<int32_t> counts(static_cast<size_t>(V), 0);
  std::vector<uint8_t> in_prompt(size_t(V), 0);
  for (int i = 0; i < 60; ++i) counts[size_t(rng() % uint64_t(V))] += 1 + int(rng() % 3);
  for (int i = 0; i < 40; ++i) in_prompt[size_t(rng() % uint64_t(V))] = 1;
  const cpu::LogitPenalties pen{0.4f, 0.3f, 1.3f};
  std::vector<float> got = lg;
  cpu::apply_penalties(got.data(), V, pen, counts.data(), in_prompt.data());
  int changed = 0;
  for (int64_t t = 0; t < V; ++t) {
    double x = lg[size_t(t)];
    const int c = counts[size_t(t)];
    if (c > 0 || in_prompt[size_t(t)]) x = x > 0 ? x / 1.3 : x * 1.3;
    if (c > 0) x -= 0.3 * c + 0.4;
    EXPECT_NEAR(got[size_t(t)], x, 1e-5 * (1 + std::abs(x))) << t;
    changed += got[size_t(t)] != lg[size_t(t)];
  }
  EXPECT_GT(changed, 50);
  // No penalty: the logits stay bit for bit.
  std::vector<float> same = lg;
  cpu::apply_penalties(same.data(), V, cpu::LogitPenalties{}, counts.data(), in_prompt.data());
  EXPECT_EQ(same, lg);
}

// Log-probabilities: log softmax of the raw logits (float64 reference), top-n descending.
TEST(Sampling, LogprobsAgainstFloat64) {
  std::mt19937_64 rng(test_seed() + 13);
  std::normal_distribution<float> nd(0.f, 4.f);
  const int64_t V = 1000;
  std::vector<float> lg(static_cast<size_t>(V));
  for (auto& x : lg) x = nd(rng) + 20.f;  // a large offset: the max subtraction matters
  double m = -1e300, z = 0;
  for (float x : lg) m = std::max(m, double(x));
  for (float x : lg) z += std::exp(double(x) - m);
  const double lse = m + std::log(z);
  std::vector<std::pair<float, int32_t>> scratch;
  cpu::TokenLogprob out;
  const int32_t tok = int32_t(rng() % uint64_t(V));
  cpu::logprobs(lg.data(), V, tok, 5, out, scratch);
  EXPECT_EQ(out.token, tok);
  EXPECT_NEAR(out.logprob, double(lg[size_t(tok)]) - lse, 1e-4);
  ASSERT_EQ(out.top.size(), 5u);
  std::vector<int32_t> order(static_cast<size_t>(V));
  for (int32_t i = 0; i < V; ++i) order[size_t(i)] = i;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return lg[size_t(a)] > lg[size_t(b)]; });
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(out.top[i].first, order[i]);
    EXPECT_NEAR(out.top[i].second, double(lg[size_t(order[i])]) - lse, 1e-4);
  }
  cpu::logprobs(lg.data(), V, tok, 0, out, scratch);
  EXPECT_TRUE(out.top.empty());
}

}  // namespace
}  // namespace atmoe::test
