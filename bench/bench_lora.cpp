// The in-process expert path alone: ExpertShard::apply per site input of every layer, as
// one decode step calls it, against the bytes that step reads (its floor). A benchmark, not
// a test: numbers depend on the machine (bench/results, docs/performance.md).
//
// Usage: bench_lora BUNDLE_DIR [--tokens T] [--active K] [--steps S] [--evict KB]
//                   [--stream MB]
//   T tokens per step (1 = decode batch 1); each token routes to K experts (columns
//   t..t+K-1, weight 1/K; K = 0: all). --evict: read KB of other memory before each call,
//   untimed (in a model the base weights, ~256 MB for SmolLM2, stream by between two uses of
//   an expert row: --evict 65536 puts the rows in DRAM as a decode step finds them).
//   --stream MB: as a model step does, stream MB of other memory per step on the pool's
//   threads, a slice before each call (untimed): the rank rows come from DRAM, while the
//   code and the per-call state stay in the caches (the base model's weights: 256).
//   Prints µs per step (median, min), per call, and GB/s of the rank rows read.
//   --base: instead, a decode step's base GEMMs too (random bf16 weights of the model's
//   q|k|v, o, gate|up and down for every layer, on the CPU backend), timed two ways,
//   interleaved step by step: the GEMMs alone; each GEMM then ExpertShard::apply, as the
//   model's in-process experts run; each GEMM then a plain read of the lines apply reads
//   (the bytes' floor: no arithmetic), on the pool's threads and on one; the experts beside
//   each GEMM (ExpertShard::post before it, finish after, as the model runs them). Prints the median
//   step of each, the extra times over the GEMMs, and where the mean step's time went.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/bundle.h"
#include "common/clock.h"
#include "common/gguf.h"
#include "common/model_config.h"
#include "kernels/backend.h"
#include "kernels/thread_pool.h"
#include "worker/expert_shard.h"

using namespace atmoe;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: %s BUNDLE_DIR [--tokens T] [--active K] [--steps S] [--evict KB] [--stream MB] [--base]\n",
                 argv[0]);
    return 2;
  }
  int64_t T = 1;
  int K = 1, S = 200, evict_kb = 0, stream_mb = 0;
  bool base = false;
  for (int i = 2; i < argc; ++i)
    if (!std::strcmp(argv[i], "--base")) base = true;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--base")) {  // a flag: no value
      --i;
      continue;
    }
    if (!std::strcmp(argv[i], "--tokens")) T = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--active")) K = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--steps")) S = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--evict")) evict_kb = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--stream")) stream_mb = std::atoi(argv[i + 1]);
  }
  try {
    Bundle b = load_bundle_manifest(argv[1]);
    GgufFile g(b.base_model);
    const ModelConfig c = config_from_gguf(g);
    std::vector<int> groups(b.groups.size());
    for (size_t i = 0; i < groups.size(); ++i) groups[i] = int(i);
    ExpertShard shard(b, shard_spec(c, DType::BF16, groups, b.general.has_value()));
    const int64_t nc = int64_t(shard.column_expert().size());
    if (K <= 0 || K > nc) K = int(nc);
    std::vector<float> coef(size_t(T * nc), 0.f);
    for (int64_t t = 0; t < T; ++t)
      for (int k = 0; k < K; ++k) coef[size_t(t * nc + (t + k) % nc)] = 1.f / float(K);
    const int64_t din_max = std::max<int64_t>(c.hidden, c.ffn);
    std::vector<float> x(size_t(T * din_max), 0.01f), y(size_t(T * 4 * din_max), 0.f);
    ThreadPool& pool = ThreadPool::global();
    const SiteInput ins[] = {SiteInput::AttnIn, SiteInput::AttnOut, SiteInput::MlpIn, SiteInput::MlpAct};
    std::vector<float> junk(size_t(evict_kb) * 256, 1.f);
    volatile float sink = 0.f;
    const auto read = [&](const std::vector<float>& v) {
      float s = 0.f;
      for (size_t i = 0; i < v.size(); i += 16) s += v[i];
      sink = sink + s;
    };
    std::vector<float> big(size_t(stream_mb) << 18, 1.f);
    const size_t slice = big.size() / size_t(4 * c.n_layers);
    size_t at = 0;
    std::vector<float> partial(size_t(pool.size()) * 16);
    const auto stream = [&] {  // the next slice of `big`, on the pool (a base GEMM's reads)
      if (big.empty()) return;
      if (at + slice > big.size()) at = 0;
      const float* b0 = big.data() + at;
      pool.run([&](int tid, int nt) {
        const size_t per = (slice + size_t(nt) - 1) / size_t(nt), lo = std::min(slice, per * size_t(tid)),
                     hi = std::min(slice, lo + per);
        float s = 0.f;
        for (size_t i = lo; i < hi; i += 16) s += b0[i];
        partial[size_t(tid) * 16] = s;
      });
      at += slice;
      sink = sink + partial[0];
    };
    if (base) {
      // The base GEMMs of one decode step: [N, K] per site input, fused as the model has them.
      Backend& be = cpu_backend();
      const int64_t d = c.hidden, F = c.ffn, qkvd = int64_t(c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
      const int64_t shapes[4][2] = {{qkvd, d}, {d, int64_t(c.n_heads) * c.head_dim}, {2 * F, d}, {d, F}};
      std::vector<PreparedWeight> w;
      uint64_t st = 88172645463325252ull;
      for (int l = 0; l < c.n_layers; ++l)
        for (auto& sh : shapes) {
          std::vector<float> m(size_t(sh[0] * sh[1]));
          for (auto& v : m) {
            st ^= st << 13, st ^= st >> 7, st ^= st << 17;
            v = float(int64_t(st >> 40) - (1 << 23)) / float(1 << 23) * 0.05f;
          }
          w.push_back(prepare_weight(be, m.data(), sh[0], sh[1], DType::BF16));
        }
      int64_t n_max = 0;
      for (auto& sh : shapes) n_max = std::max(n_max, sh[0]);
      std::vector<float> gy(size_t(T * n_max));
      Buffer ws;
      const auto gemm = [&](int l, int i) {
        const PreparedWeight& pw = w[size_t(l * 4 + i)];
        ops::MatmulParams p;
        p.x = x.data();
        p.ldx = din_max;
        p.w = pw.get();
        p.w_dtype = pw.dtype;
        p.y = gy.data();
        p.ldy = pw.N;
        p.T = T;
        p.N = pw.N;
        p.K = pw.K;
        ws.reserve(be, be.workspace_bytes(p));
        be.matmul(p, ws.get());
      };
      // The floor of the bytes: the lines apply() reads (A_b and B_b of the blocks these
      // tokens use), per (layer, site input).
      std::vector<std::vector<std::pair<const char*, size_t>>> lines(size_t(c.n_layers) * 4);
      for (int l = 0; l < c.n_layers; ++l)
        for (int i = 0; i < 4; ++i)
          for (int k = 0; k < input_site_count(ins[i]); ++k) {
            const ShardStack& st = shard.stack(l, Site(int(input_first_site(ins[i])) + k));
            for (size_t bi = 0; bi < shard.block_columns().size(); ++bi) {
              const auto [c0, c1] = shard.block_columns()[bi];
              bool used = false;
              for (int64_t t = 0; t < T; ++t)
                for (int q = 0; q < K; ++q) used |= int((t + q) % nc) >= c0 && int((t + q) % nc) < c1;
              const StackBlock& blk = st.block[bi];
              if (!used || blk.r1 == blk.r0) continue;
              const int64_t rows = blk.r1 - blk.r0;
              const DType dt = shard.spec().dtype;
              lines[size_t(l * 4 + i)].push_back(
                  {static_cast<const char*>(blk.A), size_t(rows * st.d_in) * dtype_size(dt)});
              lines[size_t(l * 4 + i)].push_back(
                  {static_cast<const char*>(blk.B), be.lora_b_bytes(st.d_out, rows, dt)});
            }
          }
      struct Touch {
        const std::vector<std::pair<const char*, size_t>>* r;
        std::atomic<uint32_t> sum{0};
      } touch_state;
      // Each line once, 8 lines ahead prefetched (within the run); thread tid of nt reads its
      // share of each run.
      const auto touch = [](Touch* ts, int tid, int nt) {
        uint32_t acc = 0;
        for (const auto& [ptr, n] : *ts->r) {
          const size_t lo = n * size_t(tid) / size_t(nt) / 64 * 64, hi = n * size_t(tid + 1) / size_t(nt) / 64 * 64;
          for (size_t o = lo; o < hi; o += 64) {
            if (o + 512 < hi) __builtin_prefetch(ptr + o + 512);
            uint16_t v;
            std::memcpy(&v, ptr + o, sizeof v);
            acc += v;
          }
        }
        ts->sum.fetch_add(acc, std::memory_order_relaxed);
      };
      // split[mode]: seconds in and after the GEMMs, summed over the timed steps.
      double split[5][2] = {};
      // 0: GEMMs; 1: each GEMM then apply; 2, 3: each GEMM then a read of apply's lines on
      // the pool's threads, on one thread; 4: the experts beside each GEMM (ExpertShard::
      // post, the GEMM, finish: as the model runs them).
      const auto run = [&](int mode, bool timed) {
        const double t0 = now_s();
        for (int l = 0; l < c.n_layers; ++l)
          for (int i = 0; i < 4; ++i) {
            const double q0 = now_s();
            if (mode == 4) shard.post(l, ins[i], x.data(), din_max, coef.data(), nc, T);
            gemm(l, i);
            const double q1 = now_s();
            if (mode == 1) shard.apply(l, ins[i], x.data(), din_max, coef.data(), nc, y.data(), 4 * din_max, T);
            if (mode == 4) shard.finish(y.data(), 4 * din_max);
            if (mode == 2 || mode == 3) {
              touch_state.r = &lines[size_t(l * 4 + i)];
              if (mode == 2) pool.run([&touch, ts = &touch_state](int tid, int nt) { touch(ts, tid, nt); });
              else touch(&touch_state, 0, 1);
            }
            if (timed) {
              split[mode][0] += q1 - q0;
              split[mode][1] += now_s() - q1;
            }
          }
        return now_s() - t0;
      };
      for (int i = 0; i < 5; ++i)
        for (int m = 0; m < 5; ++m) run(m, false);
      std::vector<double> ts[5];
      for (int i = 0; i < S; ++i)
        for (int m = 0; m < 5; ++m) ts[m].push_back(run(m, true));
      sink = sink + float(touch_state.sum.load());
      double med[5];
      for (int m = 0; m < 5; ++m) {
        std::sort(ts[m].begin(), ts[m].end());
        med[m] = ts[m][ts[m].size() / 2];
      }
      std::printf("experts %lld  tokens %lld  active %d  threads %d  isa %s\n", (long long)nc, (long long)T, K,
                  pool.size(), be.description().c_str());
      std::printf("step: base GEMMs %.1f us, with the experts %.1f us (+%.1f%%; medians of %d)\n", med[0] * 1e6,
                  med[1] * 1e6, 100 * (med[1] / med[0] - 1), S);
      std::printf("the bytes alone (a read of apply's lines after each GEMM): +%.1f%% on %d threads, +%.1f%% on one\n",
                  100 * (med[2] / med[0] - 1), pool.size(), 100 * (med[3] / med[0] - 1));
      std::printf("the experts beside each GEMM (post, GEMM, finish): +%.1f%%\n", 100 * (med[4] / med[0] - 1));
      std::printf("mean step with the experts: GEMMs %.1f us (alone %.1f), experts %.1f us\n", split[1][0] / S * 1e6,
                  split[0][0] / S * 1e6, split[1][1] / S * 1e6);
      return 0;
    }
    auto step = [&] {
      double t = 0;
      for (int l = 0; l < c.n_layers; ++l)
        for (SiteInput in : ins) {
          read(junk);
          stream();
          const double t0 = now_s();
          shard.apply(l, in, x.data(), din_max, coef.data(), nc, y.data(), 4 * din_max, T);  // on cpu_backend(): the global pool
          t += now_s() - t0;
        }
      return t;
    };
    for (int i = 0; i < 10; ++i) step();
    std::vector<double> ts;
    for (int i = 0; i < S; ++i) ts.push_back(step());
    std::sort(ts.begin(), ts.end());
    const double med = ts[ts.size() / 2];
    // Bytes of the active rows: bf16 A and B of the experts some token uses (columns t..t+K-1;
    // every expert has the same rank here).
    const double bytes = double(shard.bytes()) * double(std::min<int64_t>(nc, T + K - 1)) / double(nc);
    std::printf("experts %lld  tokens %lld  active %d  threads %d\n", (long long)nc, (long long)T, K, pool.size());
    std::printf("step %.1f us (min %.1f)  per call %.2f us  reads ~%.2f MB -> %.2f GB/s\n", med * 1e6, ts[0] * 1e6,
                med * 1e6 / (4.0 * c.n_layers), bytes / 1e6, bytes / med / 1e9);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_lora: %s\n", e.what());
    return 2;
  }
}
