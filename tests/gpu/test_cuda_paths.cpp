// The CUDA backend's own fast paths that the backend-generic suite (tests/unit/
// test_backend_ops.cpp, strided rows) does not reach: the vectorised gemv and LoRA shrink
// (rows of x with ld = K, K % 8 == 0), the gemv/cuBLAS boundary at T = 8 | 9, attention with
// D = 256 and D not a multiple of 32 over thousands of keys, argmax of a row of -inf.
// Float64 references from the row-major inputs; skips without a GPU.
#include <algorithm>
#include <cmath>

#include "kernels/backend.h"
#include "kernels/cuda/backend_cuda.h"
#include "kernels/cuda/device.cuh"
#include "tests/unit/check.h"
#include "tests/unit/op_reference.h"

namespace atmoe::test {
namespace {

class CudaPaths : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (cuda::device_count(&why) == 0) ATMOE_SKIP_OR_FAIL("no CUDA device: " << why);
    be_ = make_cuda_backend(0);
  }
  Backend& be() { return *be_; }

  template <class T>
  Buffer put(const std::vector<T>& h) {
    Buffer b(be(), h.size() * sizeof(T) + 64);
    if (!h.empty()) be().upload(b.get(), h.data(), h.size() * sizeof(T));
    return b;
  }
  template <class T>
  std::vector<T> get(const Buffer& b, size_t n) {
    std::vector<T> h(n);
    if (n) be().download(h.data(), b.get(), n * sizeof(T));
    return h;
  }

  std::unique_ptr<Backend> be_;
};

float round_bf16(float v) {
  return bf16_to_f32(f32_to_bf16(v));
}

TEST_F(CudaPaths, MatmulAlignedRowsAroundTheGemvBoundary) {
  std::mt19937_64 rng(test_seed() + 301);
  for (int64_t K : {64, 576, 1536})
    for (int64_t N : {1, 37, 130})
      for (int64_t T : {1, 2, 5, 8, 9, 17})
        for (DType dt : {DType::F32, DType::BF16})
          for (bool bias : {false, true})
            for (bool acc : {false, true}) {
              SCOPED_TRACE(::testing::Message() << "T=" << T << " N=" << N << " K=" << K << " " << dtype_name(dt)
                                                << " bias=" << bias << " acc=" << acc);
              auto x = randn(size_t(T * K), rng), w = randn(size_t(N * K), rng, 0.5f), b = randn(size_t(N), rng);
              auto y0 = randn(size_t(T * N), rng);
              std::vector<float> want(y0.size());
              for (int64_t t = 0; t < T; ++t)
                for (int64_t n = 0; n < N; ++n) {
                  double s = bias ? b[size_t(n)] : 0.0;
                  for (int64_t k = 0; k < K; ++k) {
                    const float wv = w[size_t(n * K + k)];
                    s += double(x[size_t(t * K + k)]) * (dt == DType::BF16 ? round_bf16(wv) : wv);
                  }
                  want[size_t(t * N + n)] = float(s + (acc ? double(y0[size_t(t * N + n)]) : 0.0));
                }
              PreparedWeight pw = prepare_weight(be(), w.data(), N, K, dt);
              Buffer dx = put(x), db = put(b), dy = put(acc ? y0 : poisoned(y0.size()));
              ops::MatmulParams p;
              p.x = dx.as<float>();
              p.ldx = K;
              p.w = pw.get();
              p.w_dtype = dt;
              p.bias = bias ? db.as<float>() : nullptr;
              p.y = dy.as<float>();
              p.ldy = N;
              p.T = T;
              p.N = N;
              p.K = K;
              p.accumulate = acc;
              Buffer ws(be(), be().workspace_bytes(p) + 16);
              be().matmul(p, ws.get());
              const double a = (dt == DType::BF16 ? 1e-2 : 4e-5) * std::sqrt(double(K));
              auto got = get<float>(dy, want.size());
              ASSERT_TRUE(all_close(got.data(), want.data(), got.size(), {a, dt == DType::BF16 ? 1e-2 : 1e-5}));
            }
}

// One site, d_in = 64 (the vectorised shrink), blocks [0,4) [4,10) [10,12) [12,20), each
// block's weights in memory of its own: token 0 in the adjacent blocks 0 and 1, token 2 in
// blocks 0 and 3 (two ranges of one expand item), token 4 in block 2 only, tokens 1 and 3 in
// none (y untouched).
TEST_F(CudaPaths, LoraAlignedRowsAndSeveralBlocksPerToken) {
  std::mt19937_64 rng(test_seed() + 302);
  const int64_t T = 5, din = 64, dout = 300, R = 20, C = 4;
  const std::vector<int64_t> bounds{0, 4, 4, 10, 10, 12, 12, 20};
  const std::vector<std::vector<int32_t>> toks{{0, 2}, {0}, {4}, {2}};
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    auto x = randn(size_t(T * din), rng), A = randn(size_t(R * din), rng, 0.3f), B = randn(size_t(dout * R), rng);
    auto coef = randn(size_t(T * C), rng), y0 = randn(size_t(T * dout), rng);
    if (dt == DType::BF16) {
      for (auto& v : A) v = round_bf16(v);
      for (auto& v : B) v = round_bf16(v);
    }
    std::vector<int32_t> row_col(R);
    std::vector<float> row_scale(R);
    for (int64_t r = 0; r < R; ++r) {
      row_col[size_t(r)] = r == 7 ? -1 : int32_t(r % C);
      row_scale[size_t(r)] = 0.5f + 0.1f * float(r);
    }
    std::vector<float> want = y0;
    for (size_t b = 0; b < toks.size(); ++b)
      for (int32_t t : toks[b])
        for (int64_t n = 0; n < dout; ++n) {
          double acc = 0;
          for (int64_t r = bounds[2 * b]; r < bounds[2 * b + 1]; ++r) {
            if (row_col[size_t(r)] < 0) continue;
            double ax = 0;
            for (int64_t k = 0; k < din; ++k) ax += double(A[size_t(r * din + k)]) * x[size_t(t * din + k)];
            acc += double(B[size_t(n * R + r)]) * ax * coef[size_t(t * C + row_col[size_t(r)])] * row_scale[size_t(r)];
          }
          want[size_t(t * dout + n)] += float(acc);
        }
    // Each block's weights on their own (ops.h): A_b rows and B_b prepared for the block.
    std::vector<Buffer> dA, dB;
    std::vector<ops::LoraBlock> blocks(toks.size());
    for (size_t b = 0; b < toks.size(); ++b) {
      const int64_t r0 = bounds[2 * b], r1 = bounds[2 * b + 1], rows = r1 - r0;
      std::vector<float> Ab(A.begin() + r0 * din, A.begin() + r1 * din), Bb(size_t(dout * rows));
      for (int64_t n = 0; n < dout; ++n)
        for (int64_t r = 0; r < rows; ++r) Bb[size_t(n * rows + r)] = B[size_t(n * R + r0 + r)];
      if (dt == DType::F32) {
        dA.push_back(put(Ab));
      } else {
        std::vector<uint16_t> h(Ab.size());
        f32_to_bf16_n(Ab.data(), h.data(), Ab.size());
        dA.push_back(put(h));
      }
      dB.emplace_back(be(), be().lora_b_bytes(dout, rows, dt));
      be().prepare_lora_b(Bb.data(), dout, rows, dt, dB.back().get());
      blocks[b] = {r0, r1, dA.back().get(), dB.back().get(), toks[b].data(), int64_t(toks[b].size())};
    }
    Buffer dx = put(x), dc = put(coef), dy = put(y0), drc = put(row_col), drs = put(row_scale);
    ops::LoraSite s;
    s.R = R;
    s.d_out = dout;
    s.row_col = drc.as<int32_t>();
    s.row_scale = drs.as<float>();
    s.blocks = blocks.data();
    s.n_blocks = int64_t(blocks.size());
    s.y = dy.as<float>();
    s.ldy = dout;
    ops::LoraMixParams p;
    p.x = dx.as<float>();
    p.ldx = din;
    p.T = T;
    p.d_in = din;
    p.dtype = dt;
    p.coef = dc.as<float>();
    p.ldc = C;
    p.sites = &s;
    p.n_sites = 1;
    Buffer ws = put(poisoned(be().workspace_bytes(p) / 4 + 4));
    be().lora_mix(p, ws.get());
    auto got = get<float>(dy, want.size());
    EXPECT_TRUE(all_close(got.data(), want.data(), got.size(), {1e-4, 1e-5}));
  }
}

TEST_F(CudaPaths, AttentionWideAndOddHeadDimsLongContext) {
  std::mt19937_64 rng(test_seed() + 303);
  for (auto [Hq, Hkv, D] : {std::tuple<int64_t, int64_t, int64_t>{8, 2, 256}, {4, 1, 80}, {2, 2, 1}}) {
    SCOPED_TRACE(::testing::Message() << "Hq=" << Hq << " Hkv=" << Hkv << " D=" << D);
    // Sequence 0: a decode step at position 2999; sequence 1: a chunk of 9 rows at 30..38.
    const std::vector<int64_t> ctx{3000, 39}, Ts{1, 9};
    const int64_t total = 10, ldq = Hq * D, ldkv = Hkv * D;
    auto q = randn(size_t(total * ldq), rng);
    std::vector<std::vector<float>> ks, vs;
    std::vector<int32_t> pos;
    for (size_t s = 0; s < ctx.size(); ++s) {
      ks.push_back(randn(size_t(ctx[s] * ldkv), rng));
      vs.push_back(randn(size_t(ctx[s] * ldkv), rng));
      for (int64_t j = 0; j < Ts[s]; ++j) pos.push_back(int32_t(ctx[s] - Ts[s] + j));
    }
    const float scale = 1.f / std::sqrt(float(D));
    std::vector<float> want(size_t(total * ldq));
    int64_t t = 0;
    for (size_t s = 0; s < ctx.size(); ++s)
      for (int64_t j = 0; j < Ts[s]; ++j, ++t)
        attention_row_f64(q.data() + t * ldq, ks[s].data(), vs[s].data(), ldkv, Hq, Hkv, D, pos[size_t(t)], scale,
                          want.data() + t * ldq);
    Buffer dq = put(q), dpos = put(pos), dout = put(poisoned(want.size()));
    Buffer dk0 = put(ks[0]), dv0 = put(vs[0]), dk1 = put(ks[1]), dv1 = put(vs[1]);
    std::vector<ops::AttentionSeq> seqs{{0, 1, dk0.as<float>(), dv0.as<float>(), dpos.as<int32_t>()},
                                        {1, 9, dk1.as<float>(), dv1.as<float>(), dpos.as<int32_t>() + 1}};
    ops::AttentionParams p;
    p.q = dq.as<float>();
    p.ldq = ldq;
    p.out = dout.as<float>();
    p.ldo = ldq;
    p.Hq = Hq;
    p.Hkv = Hkv;
    p.D = D;
    p.scale = scale;
    p.seqs = seqs.data();
    p.n_seqs = 2;
    p.max_ctx = 3000;
    Buffer ws(be(), be().workspace_bytes(p) + 16);
    be().attention(p, ws.get());
    auto got = get<float>(dout, want.size());
    EXPECT_TRUE(all_close(got.data(), want.data(), got.size(), {2e-5, 1e-4}));
  }
}

TEST_F(CudaPaths, ArgmaxOfAllMinusInfIsZeroAndTiesTakeTheLowestId) {
  const int64_t V = 5000, R = 3;
  std::vector<float> lg(size_t(R * V), -INFINITY);
  lg[size_t(V + 4321)] = 2.f;
  lg[size_t(V + 4999)] = 2.f;
  for (int64_t i = 0; i < V; ++i) lg[size_t(2 * V + i)] = 1.f;  // all tied
  Buffer dl = put(lg), dout = put(std::vector<int32_t>(size_t(R), -1));
  ops::SampleParams p;
  p.logits = dl.as<float>();
  p.ld = V;
  p.R = R;
  p.V = V;
  p.out = dout.as<int32_t>();
  be().sample_rows(p);
  EXPECT_EQ(get<int32_t>(dout, size_t(R)), (std::vector<int32_t>{0, 4321, 0}));
}

}  // namespace
}  // namespace atmoe::test
