// Every op of kernels/ops.h on every registered backend (TEST_P over backend_names(): cpu
// always, cuda in CUDA builds; a backend that cannot run here skips), against float64
// references computed here from the row-major inputs, with the one tolerance table
// (tests/unit/check.h), fresh seeds (ATMOE_TEST_SEED replays one) and outputs poisoned with
// NaN before each run so an element the op does not write fails. Inputs and outputs move
// through the Backend's own memory calls; weights go through its prepare step, so a test
// never knows the backend's layout.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/backend.h"
#include "kernels/cpu/sampling.h"
#include "kernels/thread_pool.h"
#include "tests/unit/check.h"
#include "tests/unit/op_reference.h"

namespace atmoe::test {
namespace {

ThreadPool& pool2() {
  static ThreadPool p(2);
  return p;
}

// A host vector copied into backend memory, followed by kSlack bytes of NaN (0xff) that
// fetch() checks are still there: a write past the end fails the test.
constexpr size_t kSlack = 256;
struct DevBuf {
  Buffer buf;
  size_t bytes = 0;
  template <class T>
  DevBuf(Backend& be, const std::vector<T>& h) : buf(be, h.size() * sizeof(T) + kSlack), bytes(h.size() * sizeof(T)) {
    if (bytes) be.upload(buf.get(), h.data(), bytes);
    be.memset(static_cast<char*>(buf.get()) + bytes, 0xff, kSlack);
  }
  template <class T>
  T* as() const {
    return buf.as<T>();
  }
};

template <class T>
std::vector<T> fetch(Backend& be, const DevBuf& d) {
  std::vector<uint8_t> raw(d.bytes + kSlack);
  be.download(raw.data(), d.buf.get(), raw.size());
  for (size_t i = d.bytes; i < raw.size(); ++i) {
    EXPECT_EQ(raw[i], 0xff) << "written " << i - d.bytes << " bytes past the end of a " << d.bytes << "-byte output";
    if (raw[i] != 0xff) break;
  }
  std::vector<T> h(d.bytes / sizeof(T));
  std::memcpy(h.data(), raw.data(), d.bytes);
  return h;
}

// A workspace of exactly the size the backend asked for, poisoned with NaN.
DevBuf workspace(Backend& be, size_t bytes) {
  return DevBuf(be, std::vector<uint8_t>(bytes, 0xff));
}

float round_bf16(float v) {
  return bf16_to_f32(f32_to_bf16(v));
}
std::vector<float> round_bf16(std::vector<float> v) {
  for (auto& x : v) x = round_bf16(x);
  return v;
}

class BackendOps : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string why;
    if (!backend_available(GetParam(), &why)) ATMOE_SKIP_OR_FAIL(GetParam() << ": " << why);
    be_ = make_backend(GetParam(), &pool2());
    std::printf("backend: %s\n", be_->description().c_str());
  }
  Backend& be() { return *be_; }
  std::unique_ptr<Backend> be_;
};

// ---------------------------------------------------------------- matmul
struct MatmulCase {
  int64_t T, N, K;
};
// Decode (T <= 8) and prefill shapes; N and K off every tile size.
const MatmulCase kMatmulCases[] = {{1, 1, 1},     {1, 37, 576}, {3, 130, 77},  {4, 64, 1536},  {16, 67, 100},
                                   {7, 17, 15},   {13, 48, 33}, {31, 96, 64},  {33, 300, 576}, {64, 259, 100},
                                   {40, 1100, 8}, {37, 40, 50}, {38, 33, 257}, {8, 2048, 576}, {130, 576, 1536}};

TEST_P(BackendOps, MatmulMatchesFloat64) {
  std::mt19937_64 rng(test_seed() + 101);
  for (const auto& c : kMatmulCases)
    for (DType wdt : {DType::F32, DType::BF16})
      for (bool bias : {false, true})
        for (bool acc : {false, true}) {
          SCOPED_TRACE(::testing::Message() << "T=" << c.T << " N=" << c.N << " K=" << c.K << " w=" << dtype_name(wdt)
                                            << " bias=" << bias << " acc=" << acc);
          const int64_t ldx = c.K + 3, ldy = c.N + 5;  // strided rows
          auto x = randn(size_t(c.T * ldx), rng);
          auto w = randn(size_t(c.N * c.K), rng, 0.5f);
          auto b = randn(size_t(c.N), rng);
          auto y0 = randn(size_t(c.T * ldy), rng);
          const std::vector<float> wr = wdt == DType::BF16 ? round_bf16(w) : w;
          std::vector<float> want = y0;
          for (int64_t t = 0; t < c.T; ++t)
            for (int64_t n = 0; n < c.N; ++n) {
              double s = bias ? b[size_t(n)] : 0.0;
              for (int64_t k = 0; k < c.K; ++k) s += double(x[size_t(t * ldx + k)]) * wr[size_t(n * c.K + k)];
              want[size_t(t * ldy + n)] = float(s + (acc ? double(y0[size_t(t * ldy + n)]) : 0.0));
            }
          // Outside [T, N] (the stride gap) the output must be untouched.
          std::vector<float> init = acc ? y0 : poisoned(y0.size());
          for (int64_t t = 0; t < c.T; ++t)
            for (int64_t n = c.N; n < ldy; ++n) init[size_t(t * ldy + n)] = want[size_t(t * ldy + n)] = 7.f;
          PreparedWeight pw = prepare_weight(be(), w.data(), c.N, c.K, wdt);
          DevBuf dx(be(), x), db(be(), b), dy(be(), init);
          ops::MatmulParams p;
          p.x = dx.as<float>();
          p.ldx = ldx;
          p.w = pw.get();
          p.w_dtype = wdt;
          p.bias = bias ? db.as<float>() : nullptr;
          p.y = dy.as<float>();
          p.ldy = ldy;
          p.T = c.T;
          p.N = c.N;
          p.K = c.K;
          p.accumulate = acc;
          DevBuf ws = workspace(be(), be().workspace_bytes(p));
          be().matmul(p, ws.buf.get());
          auto got = fetch<float>(be(), dy);
          EXPECT_TRUE(
              all_close(got.data(), want.data(), got.size(), wdt == DType::BF16 ? kSumBF16(c.K) : kSumF32(c.K)));
        }
}

// ---------------------------------------------------------------- rmsnorm, silu_mul, softmax
TEST_P(BackendOps, RmsNormMatchesFloat64InPlaceToo) {
  std::mt19937_64 rng(test_seed() + 102);
  for (auto [T, D] : {std::pair<int64_t, int64_t>{1, 1}, {3, 576}, {17, 64}, {2, 4097}, {64, 4096}}) {
    // x with a row stride past D (the model normalises rows of wider buffers); y dense.
    const int64_t ldx = D + 3;
    auto x = randn(size_t(T * ldx), rng, 3.f);
    auto w = randn(size_t(D), rng);
    std::vector<float> want(static_cast<size_t>(T * D)), want_inplace = x;
    for (int64_t t = 0; t < T; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += double(x[size_t(t * ldx + i)]) * x[size_t(t * ldx + i)];
      const double inv = 1.0 / std::sqrt(ss / double(D) + 1e-5);
      for (int64_t i = 0; i < D; ++i)
        want_inplace[size_t(t * ldx + i)] = want[size_t(t * D + i)] =
            float(x[size_t(t * ldx + i)] * inv * w[size_t(i)]);
    }
    DevBuf dx(be(), x), dw(be(), w), dy(be(), poisoned(want.size()));
    be().rmsnorm({dx.as<float>(), ldx, dw.as<float>(), dy.as<float>(), D, T, D, 1e-5f});
    EXPECT_TRUE(all_close(fetch<float>(be(), dy).data(), want.data(), want.size(), kF32)) << "T=" << T << " D=" << D;
    be().rmsnorm({dx.as<float>(), ldx, dw.as<float>(), dx.as<float>(), ldx, T, D, 1e-5f});  // the gap untouched
    EXPECT_TRUE(all_close(fetch<float>(be(), dx).data(), want_inplace.data(), want_inplace.size(), kF32)) << "in place";
  }
}

TEST_P(BackendOps, SiluMulMatchesFloat64) {
  std::mt19937_64 rng(test_seed() + 103);
  for (auto [T, F] : {std::pair<int64_t, int64_t>{9, 1000}, {1, 1536}, {70, 33}}) {
    auto gu = randn(size_t(T * 2 * F), rng, 4.f);
    std::vector<float> want(static_cast<size_t>(T * F));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < F; ++i) {
        const double g = gu[size_t(t * 2 * F + i)], u = gu[size_t(t * 2 * F + F + i)];
        want[size_t(t * F + i)] = float(g / (1.0 + std::exp(-g)) * u);
      }
    DevBuf dgu(be(), gu), dout(be(), poisoned(want.size()));
    be().silu_mul({dgu.as<float>(), 2 * F, dgu.as<float>() + F, 2 * F, dout.as<float>(), F, T, F});
    EXPECT_TRUE(all_close(fetch<float>(be(), dout).data(), want.data(), want.size(), kF32));
    // In place over g (the model's layout writes the product over the gate half).
    be().silu_mul({dgu.as<float>(), 2 * F, dgu.as<float>() + F, 2 * F, dgu.as<float>(), 2 * F, T, F});
    auto back = fetch<float>(be(), dgu);
    for (int64_t t = 0; t < T; ++t)
      ASSERT_TRUE(all_close(back.data() + t * 2 * F, want.data() + t * F, size_t(F), kF32)) << "in place, row " << t;
  }
}

TEST_P(BackendOps, SoftmaxRowsWithMaskedEntries) {
  std::mt19937_64 rng(test_seed() + 104);
  const int64_t R = 5, C = 50, ld = 53;
  auto x = randn(size_t(R * ld), rng, 10.f);
  x[3] = -INFINITY;
  for (int64_t i = 0; i < C; ++i) x[size_t(2 * ld + i)] = -INFINITY;  // a fully masked row
  std::vector<float> want = x;
  for (int64_t r = 0; r < R; ++r) {
    double m = -INFINITY, z = 0;
    for (int64_t i = 0; i < C; ++i) m = std::max(m, 0.5 * x[size_t(r * ld + i)]);
    for (int64_t i = 0; i < C; ++i) z += std::isfinite(m) ? std::exp(0.5 * x[size_t(r * ld + i)] - m) : 0.0;
    for (int64_t i = 0; i < C; ++i)
      want[size_t(r * ld + i)] = std::isfinite(m) ? float(std::exp(0.5 * x[size_t(r * ld + i)] - m) / z) : 0.f;
  }
  DevBuf dx(be(), x);
  be().softmax_rows({dx.as<float>(), ld, R, C, 0.5f});
  auto got = fetch<float>(be(), dx);
  EXPECT_TRUE(all_close(got.data(), want.data(), got.size(), kF32));  // the stride gap included: untouched
  EXPECT_EQ(got[3], 0.f);
  EXPECT_EQ(got[size_t(2 * ld + 7)], 0.f);
}

// ---------------------------------------------------------------- rope
TEST_P(BackendOps, RopeBothStylesMatchFloat64) {
  std::mt19937_64 rng(test_seed() + 105);
  const int64_t T = 7, H = 3, D = 64, ld = H * D + 5;
  std::vector<int32_t> pos{0, 1, 2, 100, 4095, 8191, 131071};
  std::vector<float> inv(D / 2);
  for (int64_t i = 0; i < D / 2; ++i) inv[size_t(i)] = float(std::pow(100000.0, -2.0 * double(i) / double(D)));
  for (bool neox : {true, false}) {
    auto x = randn(size_t(T * ld), rng);
    std::vector<float> want = x;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D / 2; ++i) {
          // The angle in float64 (positions past 1e5 times frequencies near 1 lose digits in f32).
          const double ang = double(pos[size_t(t)]) * double(inv[size_t(i)]);
          const int64_t a = t * ld + h * D + (neox ? i : 2 * i), b = neox ? a + D / 2 : a + 1;
          const double x0 = x[size_t(a)], x1 = x[size_t(b)];
          want[size_t(a)] = float(x0 * std::cos(ang) - x1 * std::sin(ang));
          want[size_t(b)] = float(x0 * std::sin(ang) + x1 * std::cos(ang));
        }
    DevBuf dx(be(), x), dp(be(), pos), di(be(), inv);
    be().rope({dx.as<float>(), ld, T, H, D, dp.as<int32_t>(), di.as<float>(), neox});
    EXPECT_TRUE(all_close(fetch<float>(be(), dx).data(), want.data(), want.size(), kF32)) << "neox=" << neox;
  }
}

// ---------------------------------------------------------------- attention
TEST_P(BackendOps, AttentionPackedSequencesGqaMatchFloat64) {
  std::mt19937_64 rng(test_seed() + 106);
  for (auto [Hq, Hkv, D] : {std::tuple<int64_t, int64_t, int64_t>{6, 2, 32}, {9, 3, 64}, {4, 4, 128}, {3, 1, 80}}) {
    SCOPED_TRACE(::testing::Message() << "Hq=" << Hq << " Hkv=" << Hkv << " D=" << D);
    const int64_t ldq = Hq * D + 8, ldkv = Hkv * D, ldo = Hq * D + 3;
    // A fresh prefill of 5, a decode step at 40, a chunk of 3 at 10..12, a prefill of 37, a
    // chunk of 20 at 40..59, and a decode step over 1500 cached positions.
    struct S {
      int64_t ctx, T;
    };
    std::vector<S> ss{{5, 5}, {41, 1}, {13, 3}, {37, 37}, {60, 20}, {1500, 1}};
    int64_t total = 0, max_ctx = 0;
    for (auto& s : ss) total += s.T, max_ctx = std::max(max_ctx, s.ctx);
    auto q = randn(size_t(total * ldq), rng);
    std::vector<std::vector<float>> ks, vs;
    std::vector<int32_t> pos;
    for (auto& s : ss) {
      ks.push_back(randn(size_t(s.ctx * ldkv), rng));
      vs.push_back(randn(size_t(s.ctx * ldkv), rng));
      for (int64_t j = 0; j < s.T; ++j) pos.push_back(int32_t(s.ctx - s.T + j));
    }
    const float scale = 1.f / std::sqrt(float(D));
    std::vector<float> want(static_cast<size_t>(total * ldo), 3.f);
    for (int64_t si = 0, t = 0; si < int64_t(ss.size()); ++si)
      for (int64_t j = 0; j < ss[size_t(si)].T; ++j, ++t)
        attention_row_f64(q.data() + t * ldq, ks[size_t(si)].data(), vs[size_t(si)].data(), ldkv, Hq, Hkv, D,
                          pos[size_t(t)], scale, want.data() + t * ldo);
    DevBuf dq(be(), q), dpos(be(), pos);
    std::vector<DevBuf> dk, dv;
    for (size_t i = 0; i < ss.size(); ++i) dk.emplace_back(be(), ks[i]), dv.emplace_back(be(), vs[i]);
    std::vector<float> init = poisoned(want.size());
    for (int64_t t = 0; t < total; ++t)
      for (int64_t i = Hq * D; i < ldo; ++i) init[size_t(t * ldo + i)] = 3.f;  // the stride gap: untouched
    DevBuf dout(be(), init);
    std::vector<ops::AttentionSeq> seqs;
    int64_t t0 = 0;
    for (size_t i = 0; i < ss.size(); ++i) {
      seqs.push_back({t0, ss[i].T, dk[i].as<float>(), dv[i].as<float>(), dpos.as<int32_t>() + t0});
      t0 += ss[i].T;
    }
    ops::AttentionParams p;
    p.q = dq.as<float>();
    p.ldq = ldq;
    p.out = dout.as<float>();
    p.ldo = ldo;
    p.Hq = Hq;
    p.Hkv = Hkv;
    p.D = D;
    p.scale = scale;
    p.seqs = seqs.data();
    p.n_seqs = int64_t(seqs.size());
    p.max_ctx = max_ctx;
    DevBuf ws = workspace(be(), be().workspace_bytes(p));
    be().attention(p, ws.buf.get());
    EXPECT_TRUE(all_close(fetch<float>(be(), dout).data(), want.data(), want.size(), kSumF32(D)));
  }
}

// ---------------------------------------------------------------- LoRA shrink -> mix -> expand
void check_lora_mix(Backend& be, int64_t T, uint64_t salt) {
  // Two sites fed by one input (as q and k are), experts of ranks 3, 8, 5 | 16 | 7 | 1 | 30 |
  // 24, 16 in six groups (a block of 40 rows), stacked without padding. Group 2 has nonzero coefficients but is listed
  // for no token: it must not reach y; inside a block only the listed tokens are computed.
  SCOPED_TRACE("T = " + std::to_string(T));
  std::mt19937_64 rng(test_seed() + 200 + salt);
  const int64_t din = 70;
  const std::vector<int64_t> douts{45, 70};
  const std::vector<std::vector<int64_t>> groups{{3, 8, 5}, {16}, {7}, {1}, {30}, {24, 16}};
  struct Ex {
    int64_t row0, r, group;
    std::vector<float> A, B;
  };
  int64_t n_ex = 0;
  for (const auto& g : groups) n_ex += int64_t(g.size());
  std::vector<float> coef(static_cast<size_t>(T * n_ex)), scale(static_cast<size_t>(n_ex));
  for (auto& v : scale) v = std::uniform_real_distribution<float>(0.5f, 2.f)(rng);
  for (auto& v : coef) v = rng() % 4 == 0 ? 0.f : std::uniform_real_distribution<float>(-1, 1)(rng);
  auto x = randn(size_t(T * din), rng);
  // Token lists per group (the same for both sites).
  std::vector<std::vector<int32_t>> toks(groups.size());
  {
    int64_t c0 = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      const int64_t c1 = c0 + int64_t(groups[g].size());
      if (g != 2)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t c = c0; c < c1; ++c)
            if (coef[size_t(t * n_ex + c)] != 0) {
              toks[g].push_back(int32_t(t));
              break;
            }
      c0 = c1;
    }
  }
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    std::vector<std::vector<Ex>> exs(douts.size());
    std::vector<std::vector<ops::LoraBlock>> blks(douts.size());
    std::vector<std::vector<int32_t>> row_col(douts.size());
    std::vector<std::vector<float>> row_scale(douts.size());
    // Both sites write one y side by side ([T, ldy], site s at column ycol[s], a gap after),
    // as the shards do (the input's sites' deltas in one matrix).
    std::vector<int64_t> ycol;
    int64_t ldy = 0;
    for (int64_t d : douts) ycol.push_back(ldy), ldy += d;
    ldy += 3;
    std::vector<float> y0 = randn(size_t(T * ldy), rng), want = y0;
    std::vector<DevBuf> dA, dRC, dRS;
    std::vector<Buffer> dB;
    std::vector<ops::LoraSite> sites(douts.size());
    for (size_t si = 0; si < douts.size(); ++si) {
      const int64_t dout = douts[si];
      int64_t R = 0, col = 0;
      for (size_t g = 0; g < groups.size(); ++g) {
        ops::LoraBlock b;
        b.r0 = R;
        for (int64_t r : groups[g]) {
          exs[si].push_back({R, r, int64_t(g), randn(size_t(r * din), rng), randn(size_t(dout * r), rng)});
          for (int64_t i = 0; i < r; ++i) {
            row_col[si].push_back(int32_t(col));
            row_scale[si].push_back(scale[size_t(col)]);
          }
          R += r;
          ++col;
        }
        b.r1 = R;
        b.toks = toks[g].data();
        b.n_toks = int64_t(toks[g].size());
        blks[si].push_back(b);
      }
      if (dt == DType::BF16)
        for (auto& e : exs[si]) e.A = round_bf16(e.A), e.B = round_bf16(e.B);
      // Independent: per expert, in float64, from the row-major matrices.
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < dout; ++n) {
          double acc = y0[size_t(t * ldy + ycol[si] + n)];
          int64_t c = 0;
          for (const auto& e : exs[si]) {
            if (e.group != 2)
              for (int64_t i = 0; i < e.r; ++i) {
                double ax = 0;
                for (int64_t k = 0; k < din; ++k) ax += double(e.A[size_t(i * din + k)]) * x[size_t(t * din + k)];
                acc += double(coef[size_t(t * n_ex + c)]) * scale[size_t(c)] * double(e.B[size_t(n * e.r + i)]) * ax;
              }
            ++c;
          }
          want[size_t(t * ldy + ycol[si] + n)] = float(acc);
        }
      // Each block's weights in memory of its own, allocated last block first (the op must
      // follow the blocks' pointers, not assume one matrix per site).
      for (size_t g = groups.size(); g-- > 0;) {
        ops::LoraBlock& b = blks[si][g];
        const int64_t rows = b.r1 - b.r0;
        std::vector<float> A(size_t(rows * din)), B(size_t(dout * rows));
        for (const auto& e : exs[si]) {
          if (e.group != int64_t(g)) continue;
          for (int64_t i = 0; i < e.r; ++i) {
            const int64_t r = e.row0 - b.r0 + i;
            for (int64_t k = 0; k < din; ++k) A[size_t(r * din + k)] = e.A[size_t(i * din + k)];
            for (int64_t n = 0; n < dout; ++n) B[size_t(n * rows + r)] = e.B[size_t(n * e.r + i)];
          }
        }
        if (dt == DType::F32) {
          dA.emplace_back(be, A);
        } else {
          std::vector<uint16_t> Ab(A.size());
          f32_to_bf16_n(A.data(), Ab.data(), A.size());
          dA.emplace_back(be, Ab);
        }
        dB.emplace_back(be, be.lora_b_bytes(dout, rows, dt));
        be.prepare_lora_b(B.data(), dout, rows, dt, dB.back().get());
        b.A = dA.back().buf.get();
        b.B = dB.back().get();
      }
      dRC.emplace_back(be, row_col[si]);
      dRS.emplace_back(be, row_scale[si]);
      ops::LoraSite& s = sites[si];
      s.R = R;
      s.d_out = dout;
      s.row_col = dRC.back().as<int32_t>();
      s.row_scale = dRS.back().as<float>();
      s.blocks = blks[si].data();
      s.n_blocks = int64_t(blks[si].size());
      s.ldy = ldy;
    }
    DevBuf dx(be, x), dc(be, coef), dY(be, y0);
    for (size_t si = 0; si < douts.size(); ++si) sites[si].y = dY.as<float>() + ycol[si];
    ops::LoraMixParams p;
    p.x = dx.as<float>();
    p.ldx = din;
    p.T = T;
    p.d_in = din;
    p.dtype = dt;
    p.coef = dc.as<float>();
    p.ldc = n_ex;
    p.sites = sites.data();
    p.n_sites = int(sites.size());
    // The workspace is poisoned: a u entry the expand reads but the shrink did not write
    // turns y into NaN.
    DevBuf ws = workspace(be, be.workspace_bytes(p));
    be.lora_mix(p, ws.buf.get());
    EXPECT_TRUE(all_close(fetch<float>(be, dY).data(), want.data(), want.size(), kSumF32(din)));
  }
}

TEST_P(BackendOps, LoraShrinkMixExpandMatchesPerExpertFloat64) {
  // 200 tokens: blocks with many tokens (the CPU packs rows into a GEMM panel); 13: small
  // work; 6, 3 and 1: few tokens per block (the dot-product and decode paths).
  for (auto [T, salt] : {std::pair<int64_t, uint64_t>{200, 3}, {13, 0}, {6, 4}, {3, 1}, {1, 2}})
    check_lora_mix(be(), T, salt);
}

// ---------------------------------------------------------------- T-REX
TEST_P(BackendOps, TrexRankOneExpertsMatchFloat64Transcription) {
  std::mt19937_64 rng(test_seed() + 107);
  for (DType dt : {DType::F32, DType::BF16})
    for (int variant : {0, 1, 2, 3}) {
      // diagonal (rank1) or not; gathered rows with an intuition term, or every row of x
      // with none (rows = s = nullptr).
      const bool diagonal = variant & 1, gather = !(variant & 2);
      SCOPED_TRACE(::testing::Message() << dtype_name(dt) << " diagonal=" << diagonal << " gather=" << gather);
      const int64_t din = 40, dout = 33, r1 = diagonal ? 6 : 4, r2 = diagonal ? 6 : 3, E = diagonal ? 6 : 12;
      const int64_t Tall = 9, R = r1 + E + 5;  // rows past r1 + E are zero (a backend may pad)
      auto A = randn(size_t(r1 * din), rng, 0.3f), Wr = randn(size_t(E * din), rng, 0.3f),
           B = randn(size_t(dout * r2), rng);
      if (dt == DType::BF16) A = round_bf16(A), Wr = round_bf16(Wr), B = round_bf16(B);
      std::vector<float> aw(static_cast<size_t>(R * din), 0.f);
      std::copy(A.begin(), A.end(), aw.begin());
      std::copy(Wr.begin(), Wr.end(), aw.begin() + r1 * din);
      auto x = randn(size_t(Tall * din), rng);
      std::vector<int32_t> rows{0, 2, 3, 7, 8};  // tokens 1, 4, 5, 6 do not route (their y is untouched)
      if (!gather) rows = {0, 1, 2, 3, 4, 5, 6, 7, 8};
      const int64_t T = int64_t(rows.size());
      auto sv = gather ? randn(size_t(T * E), rng) : std::vector<float>(size_t(T * E), 0.f);
      std::vector<float> om(static_cast<size_t>(T));
      for (auto& o : om) o = std::uniform_real_distribution<float>(0.f, 1.f)(rng);
      // y: the module's columns at an offset inside wider rows (the input's sites side by side).
      const int64_t ldy = dout + 7, ycol = 2;
      auto y0 = randn(size_t(Tall * ldy), rng);
      std::vector<float> want = y0;
      for (int64_t j = 0; j < T; ++j)
        trex_row_f64(x.data() + rows[size_t(j)] * din, A.data(), Wr.data(), B.data(), din, dout, r1, r2, E, diagonal,
                     om[size_t(j)], sv.data() + j * E, 0.8, want.data() + rows[size_t(j)] * ldy + ycol);
      PreparedWeight pAW = prepare_weight(be(), aw.data(), R, din, dt),
                     pB = prepare_weight(be(), B.data(), dout, r2, dt);
      DevBuf dx(be(), x), drows(be(), rows), ds(be(), sv), dom(be(), om), dy(be(), y0);
      ops::TrexParams p;
      p.x = dx.as<float>();
      p.ldx = din;
      p.AW = pAW.get();
      p.B = pB.get();
      p.dtype = dt;
      p.R = R;
      p.T = T;
      p.d_in = din;
      p.d_out = dout;
      p.r1 = r1;
      p.r2 = r2;
      p.E = E;
      p.diagonal = diagonal;
      p.rows = gather ? drows.as<int32_t>() : nullptr;
      p.s = gather ? ds.as<float>() : nullptr;
      p.omega = dom.as<float>();
      p.gate = 0.8f;
      p.y = dy.as<float>() + ycol;
      p.ldy = ldy;
      DevBuf ws = workspace(be(), be().workspace_bytes(p));
      be().trex(p, ws.buf.get());
      EXPECT_TRUE(all_close(fetch<float>(be(), dy).data(), want.data(), want.size(), kSumF32(din)));
    }
}

// ---------------------------------------------------------------- sampling
// The op's spec (ops.h SampleParams) in float64: truncation, then the draw by u.
int32_t sample_spec(const std::vector<float>& lg, float temp, int top_k, float top_p, float min_p, double u) {
  const int64_t V = int64_t(lg.size());
  if (!(temp >= 1e-5f) || top_k == 1) return int32_t(std::max_element(lg.begin(), lg.end()) - lg.begin());
  const double m = *std::max_element(lg.begin(), lg.end());
  std::vector<std::pair<double, int32_t>> c;
  for (int64_t i = 0; i < V; ++i) {
    const double w = std::exp((double(lg[size_t(i)]) - m) / temp);
    if (w >= min_p) c.push_back({w, int32_t(i)});
  }
  std::sort(c.begin(), c.end(),
            [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  if (top_k > 0 && size_t(top_k) < c.size()) c.resize(size_t(top_k));
  double sum = 0, acc = 0;
  for (auto& e : c) sum += e.first;
  if (top_p < 1.f)
    for (size_t i = 0; i < c.size(); ++i)
      if ((acc += c[i].first / sum) >= top_p) {
        c.resize(i + 1);
        break;
      }
  double mass = 0;
  for (auto& e : c) mass += e.first;
  acc = 0;
  for (auto& e : c)
    if ((acc += e.first) > u * mass) return e.second;
  return c.back().second;
}

TEST_P(BackendOps, SampleRowsGreedyAndTruncatedDraws) {
  std::mt19937_64 rng(test_seed() + 108);
  const int64_t V = 49152, R = 12, ld = V + 7;
  auto lg = randn(size_t(R * ld), rng, 3.f);
  lg[5] = lg[9] = 40.f;  // row 0: a tie at the top -> the lowest id
  std::vector<float> temp(R), top_p(R), min_p(R);
  std::vector<int32_t> top_k(R);
  std::vector<double> u(R);
  for (int64_t r = 0; r < R; ++r) {
    temp[size_t(r)] = r < 3 ? 0.f : std::uniform_real_distribution<float>(0.3f, 1.5f)(rng);
    top_k[size_t(r)] = r % 4 == 1 ? 1 : r % 4 == 2 ? 40 : 0;
    top_p[size_t(r)] = r % 3 == 0 ? 0.9f : 1.f;
    min_p[size_t(r)] = r % 5 == 0 ? 0.05f : 0.f;
    u[size_t(r)] = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  }
  DevBuf dl(be(), lg), dout(be(), std::vector<int32_t>(size_t(R), -1));
  ops::SampleParams p;
  p.logits = dl.as<float>();
  p.ld = ld;
  p.R = R;
  p.V = V;
  p.temperature = temp.data();
  p.top_k = top_k.data();
  p.top_p = top_p.data();
  p.min_p = min_p.data();
  p.u = u.data();
  p.out = dout.as<int32_t>();
  be().sample_rows(p);
  auto got = fetch<int32_t>(be(), dout);
  EXPECT_EQ(got[0], 5);
  for (int64_t r = 0; r < R; ++r) {
    std::vector<float> row(lg.begin() + r * ld, lg.begin() + r * ld + V);
    EXPECT_EQ(got[size_t(r)],
              sample_spec(row, temp[size_t(r)], top_k[size_t(r)], top_p[size_t(r)], min_p[size_t(r)], u[size_t(r)]))
        << "row " << r;
  }
  // No knobs: greedy for every row.
  p.temperature = nullptr;
  p.top_k = nullptr;
  p.top_p = nullptr;
  p.min_p = nullptr;
  p.u = nullptr;
  std::vector<int32_t> minus(size_t(R), -1);
  be().upload(dout.buf.get(), minus.data(), minus.size() * 4);
  be().sample_rows(p);
  got = fetch<int32_t>(be(), dout);
  for (int64_t r = 0; r < R; ++r)
    EXPECT_EQ(got[size_t(r)],
              int32_t(std::max_element(lg.begin() + r * ld, lg.begin() + r * ld + V) - (lg.begin() + r * ld)));
}

// ---------------------------------------------------------------- memory
TEST_P(BackendOps, MemoryCallsRoundTrip) {
  std::mt19937_64 rng(test_seed() + 109);
  auto h = randn(1000, rng);
  Buffer a(be(), 4000), b(be(), 4000);
  be().upload(a.get(), h.data(), 4000);
  be().copy(b.get(), a.get(), 4000);
  be().memset(a.get(), 0, 2000);
  std::vector<float> ga(1000), gb(1000);
  be().download(ga.data(), a.get(), 4000);
  be().download(gb.data(), b.get(), 4000);
  EXPECT_EQ(gb, h);
  for (int i = 0; i < 500; ++i) ASSERT_EQ(ga[size_t(i)], 0.f);
  for (int i = 500; i < 1000; ++i) ASSERT_EQ(ga[size_t(i)], h[size_t(i)]);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.get()) % 256, 0u);
  // copy_2d: 7 rows of 5 floats out of rows of 9 into rows of 6.
  be().copy_2d(b.get(), 6 * 4, a.get(), 9 * 4, 5 * 4, 7);
  be().download(gb.data(), b.get(), 4000);
  for (int r = 0; r < 7; ++r)
    for (int i = 0; i < 5; ++i) ASSERT_EQ(gb[size_t(r * 6 + i)], ga[size_t(r * 9 + i)]) << r << " " << i;
  // Many small uploads in flight from one host buffer the caller overwrites at once (a
  // device backend stages them), then one larger than any staging slot.
  Buffer many(be(), 64 * 400);
  std::vector<float> src(100), want(64 * 100);
  for (int k = 0; k < 64; ++k) {
    for (int i = 0; i < 100; ++i) src[size_t(i)] = want[size_t(k * 100 + i)] = float(k * 1000 + i);
    be().upload(static_cast<char*>(many.get()) + k * 400, src.data(), 400);
  }
  std::fill(src.begin(), src.end(), -1.f);
  std::vector<float> got(want.size());
  be().download(got.data(), many.get(), got.size() * 4);
  EXPECT_EQ(got, want);
  auto big = randn(size_t(3) << 20, rng);  // 12 MiB
  Buffer db(be(), big.size() * 4);
  be().upload(db.get(), big.data(), big.size() * 4);
  std::vector<float> back(big.size());
  be().download(back.data(), db.get(), back.size() * 4);
  EXPECT_EQ(back, big);
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendOps, ::testing::ValuesIn(backend_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace
}  // namespace atmoe::test
