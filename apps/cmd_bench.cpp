// atmoe bench: prefill tokens/s (512-token prompt), decode tokens/s at batch 1 and 16,
// peak resident memory, and the physical floor: weight bytes read per decode step ÷
// measured memory bandwidth. Prints a table; --json writes the numbers.
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>

#include "apps/commands.h"
#include "apps/launch.h"
#include "apps/routing_flags.h"
#include "common/clock.h"
#include "common/comm_mpi.h"
#include "common/error.h"
#include "common/files.h"
#include "coordinator/experts.h"
#include "coordinator/model.h"
#include "coordinator/remote_experts.h"
#include "coordinator/trex_pool.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/sampling.h"
#include "kernels/thread_pool.h"

namespace atmoe::app {

namespace {
// Read bandwidth (GB/s): every pool thread sums its slice of a buffer larger than the caches.
double measure_bandwidth(ThreadPool& pool) {
  const size_t n = size_t(256) << 20 >> 2;  // 256 MiB of floats
  std::vector<float> buf(n, 1.f);
  double best = 0;
  std::vector<double> sink(static_cast<size_t>(pool.size()));
  for (int rep = 0; rep < 5; ++rep) {
    double t0 = now_s();
    pool.run([&](int i, int nt) {
      size_t per = n / size_t(nt), b = per * size_t(i), e = i == nt - 1 ? n : b + per;
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
      for (size_t k = b; k + 8 <= e; k += 8) {
        s0 += buf[k];
        s1 += buf[k + 1];
        s2 += buf[k + 2];
        s3 += buf[k + 3];
        s4 += buf[k + 4];
        s5 += buf[k + 5];
        s6 += buf[k + 6];
        s7 += buf[k + 7];
      }
      sink[size_t(i)] = s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
    });
    double dt = now_s() - t0;
    best = std::max(best, double(n) * 4 / dt / 1e9);
  }
  return best;
}

// Device memory bandwidth (GB/s): the best of 5 copies of 1 GiB, counting read and write.
double measure_device_bandwidth(Backend& be) {
  const size_t n = size_t(1) << 30;
  Buffer a(be, n), b(be, n);
  be.memset(a.get(), 0, n);
  be.copy(b.get(), a.get(), n);
  be.synchronize();
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = now_s();
    be.copy(b.get(), a.get(), n);
    be.synchronize();
    best = std::max(best, 2.0 * double(n) / (now_s() - t0) / 1e9);
  }
  return best;
}

}  // namespace

Runner add_bench(CLI::App& app) {
  struct Opts {
    std::string model, bundle, dtype, json, placement, device;
    int prompt = 512, decode = 64, batch = 16, reps = 3;
    bool check_tensors = false, spread = false;
    RoutingFlags rf;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model, "Model: a .gguf file or an HF directory");
  app.add_option("--bundle", o->bundle, "Also measure decode with this bundle's experts (routing flags apply)");
  add_routing_flags(app, o->rf);
  add_placement_flag(app, o->placement);
  app.add_option("--dtype", o->dtype, "bf16 (default) or f32");
  add_device_flag(app, o->device);
  app.add_option("--prompt-tokens", o->prompt, "Prefill prompt length");
  app.add_option("--decode-tokens", o->decode, "Decode steps timed");
  app.add_option("--batch", o->batch, "Sequences for the batched decode measurement");
  app.add_option("--reps", o->reps,
                 "Repetitions; in each, base and experts decode steps alternate, each timed (the median is reported, "
                 "with the range)");
  app.add_option("--json", o->json, "Also write the results as JSON to this file");
  app.add_flag("--check-tensors", o->check_tensors, "Check every base-model weight for NaN/Inf at load");
  app.add_flag("--spread-groups", o->spread,
               "AT-MoE: sequence b's group logits get +30 on group b mod G, so that with --top-k-groups the batch "
               "spreads uniformly over the groups (the router still runs)");
  return [o]() -> int {
    ATMOE_CHECK_INPUT(o->prompt >= 1 && o->prompt <= (1 << 20), "--prompt-tokens {}: must be in 1..1048576", o->prompt);
    ATMOE_CHECK_INPUT(o->decode >= 1 && o->decode <= (1 << 20), "--decode-tokens {}: must be in 1..1048576", o->decode);
    ATMOE_CHECK_INPUT(o->batch >= 1 && o->batch <= 4096, "--batch {}: must be in 1..4096", o->batch);
    ATMOE_CHECK_INPUT(o->reps >= 1 && o->reps <= 1000, "--reps {}: must be in 1..1000", o->reps);
    ATMOE_CHECK_INPUT(!o->model.empty() || !o->bundle.empty(), "bench: give --model PATH or --bundle DIR");
    const RoutingControls controls = to_controls(o->rf);
    if (o->bundle.empty()) refuse_routing_without_bundle(controls);
    ATMOE_CHECK_INPUT(!o->bundle.empty() || o->placement.empty(), "--placement needs --bundle");
    if (!o->json.empty()) require_writable_file(o->json, "--json");
    std::unique_ptr<Bundle> bundle;
    if (!o->bundle.empty()) bundle = std::make_unique<Bundle>(load_bundle_manifest(o->bundle));
    ATMOE_CHECK_INPUT(!bundle || !controls.off,
                      "bench --routing off: the experts' runs would be the base model's; bench without --bundle "
                      "measures the base model (--model, or the bundle's base_model)");
    if (bundle && bundle->method == "at-moe") (void)resolve_routing(*bundle, controls);  // before any weights load
    std::unique_ptr<Backend> device = device_backend(o->device);
    const std::string model_path = o->model.empty() ? bundle->base_model : o->model;
    auto m = Model::load(model_path, parse_dtype_flag(o->dtype), o->check_tensors, device.get());
    const int ctx = m->config().max_position;
    ATMOE_CHECK_INPUT(o->prompt <= ctx, "--prompt-tokens {}: more than the model's context length {}", o->prompt, ctx);
    ATMOE_CHECK_INPUT(32 + int64_t(o->decode) <= ctx,
                      "--decode-tokens {}: 32 prompt tokens + {} exceed the context length {}", o->decode, o->decode,
                      ctx);
    BundleExperts bx;
    if (bundle) {
      bx = attach_experts(*bundle, *m, o->placement);
      (void)bx.dispatch()->new_routing(controls);  // a bad control fails before any work
    }
    ExpertPool* const experts = bx.atmoe.get();
    TrexPool* const trex = bx.trex.get();
    ATMOE_CHECK_INPUT(!o->spread || experts != nullptr, "--spread-groups needs an AT-MoE --bundle");
    auto new_routing = [&](int b) {
      if (trex) return trex->new_routing(controls);
      if (!o->spread) return experts->new_routing(controls);
      RoutingControls c = controls;
      c.group_bias[bundle->groups[size_t(b) % bundle->groups.size()].name] += 30.0;
      return experts->new_routing(c);
    };
    const int64_t V = m->config().vocab;
    ThreadPool& pool = ThreadPool::global();
    std::mt19937 rng(1234);
    auto rand_tokens = [&](int n) {
      std::vector<int32_t> t(static_cast<size_t>(n));
      for (auto& x : t) x = int32_t(rng() % uint32_t(std::min<int64_t>(V, m->tokenizer().vocab_size())));
      return t;
    };
    std::vector<float> logits;
    // Prefill.
    double prefill_best = 0;
    auto prompt = rand_tokens(o->prompt);
    for (int r = 0; r < o->reps; ++r) {
      auto cache = m->new_cache();
      double t0 = now_s();
      m->forward({{cache.get(), prompt.data(), int64_t(prompt.size()), LogitsMode::Last}}, logits);
      prefill_best = std::max(prefill_best, double(prompt.size()) / (now_s() - t0));
    }
    // Decode at batch B: prefill a 32-token prompt per sequence, then time greedy steps
    // (decode_pair below: base and experts steps alternate).
    // Where an experts step's time goes (the timed decode loops only): the dispatch's own
    // timers on rank 0 and, with worker ranks, their compute.
    struct Split {
      double route = 0, post = 0, wait = 0, total = 0, worker_apply = 0;
      int64_t steps = 0, bytes = 0;  // bytes: data plane, to and from the workers
    };
    RemoteExperts* remote = experts ? dynamic_cast<RemoteExperts*>(&experts->backend()) : nullptr;
    auto worker_apply_s = [&]() {
      double t = 0;
      if (remote)
        for (const auto& st : remote->worker_stats()) t += st.value("apply_s", 0.0);
      return t;
    };
    auto plane_bytes = [&]() {
      int64_t n = 0;
      if (remote) {
        for (int64_t v : remote->bytes_sent()) n += v;
        for (int64_t v : remote->bytes_received()) n += v;
      }
      return n;
    };
    // One timed run at batch B: base sequences and, with a bundle, experts sequences (their own
    // caches and routing) stepped alternately, base first on even steps and experts first on odd
    // ones, each step timed alone. Drift on this shared machine moves both alike at the scale of
    // one step, so the experts' cost over the base is the ratio of the paired sums, not of two
    // separate runs.
    struct Pair {
      double base_tok_s = 0, experts_tok_s = 0;
      std::vector<double> ratios;  // per step: experts step time / base step time
    };
    auto decode_pair = [&](int B, Split* sp) {
      const bool paired = experts || trex;
      struct Seqs {
        std::vector<std::unique_ptr<KvCache>> caches;
        std::vector<std::unique_ptr<SeqRouting>> routes;
        std::vector<int32_t> next;
        std::vector<ForwardItem> items;
        void step() {
          items.clear();
          for (size_t b = 0; b < caches.size(); ++b)
            items.push_back({caches[b].get(), &next[b], 1, LogitsMode::Last, routes[b].get()});
        }
      };
      std::vector<Seqs> seqs(paired ? 2 : 1);  // [0] base, [1] experts
      for (size_t k = 0; k < seqs.size(); ++k) {
        Seqs& q = seqs[k];
        std::vector<std::vector<int32_t>> prompts;
        for (int b = 0; b < B; ++b) {
          q.caches.push_back(m->new_cache());
          prompts.push_back(rand_tokens(32));
          // Each sequence its own routing state: random prompts give each a different mixture.
          q.routes.push_back(k == 1 ? new_routing(b) : nullptr);
        }
        q.items.clear();
        for (int b = 0; b < B; ++b)
          q.items.push_back({q.caches[size_t(b)].get(), prompts[size_t(b)].data(), 32, LogitsMode::Last,
                             q.routes[size_t(b)].get()});
        m->forward(q.items, logits);
        q.next.resize(size_t(B));
        for (int b = 0; b < B; ++b) q.next[size_t(b)] = cpu::argmax(logits.data() + size_t(b) * size_t(V), V);
      }
      ExpertDispatch* ex = m->experts();
      const double w0 = sp ? worker_apply_s() : 0;
      const int64_t b0 = plane_bytes();
      Pair r;
      double tb = 0, te = 0;
      auto timed_step = [&](Seqs& q) {
        q.step();
        const double t0 = now_s();
        m->forward(q.items, logits);
        for (int b = 0; b < B; ++b) q.next[size_t(b)] = cpu::argmax(logits.data() + size_t(b) * size_t(V), V);
        return now_s() - t0;
      };
      if (sp && ex) ex->times() = {};
      for (int s = 0; s < o->decode; ++s) {
        if (!paired) {
          tb += timed_step(seqs[0]);
          continue;
        }
        double b, e;
        if (s % 2 == 0) {
          b = timed_step(seqs[0]);
          e = timed_step(seqs[1]);
        } else {
          e = timed_step(seqs[1]);
          b = timed_step(seqs[0]);
        }
        tb += b;
        te += e;
        r.ratios.push_back(e / b);
      }
      if (sp && ex) {  // the base steps post and wait nothing (their route() finds no routed row)
        sp->route += ex->times().route_s;
        sp->post += ex->times().post_s;
        sp->wait += ex->times().wait_s;
        sp->total += te;
        sp->steps += o->decode;
        sp->worker_apply += worker_apply_s() - w0;
        sp->bytes += plane_bytes() - b0;
      }
      r.base_tok_s = double(B) * o->decode / tb;
      if (paired) r.experts_tok_s = double(B) * o->decode / te;
      return r;
    };
    // Medians over reps with their range; the experts' extra time from the paired steps.
    std::vector<double> d1s, dBs, e1s, eBs, x1s, xBs, q1, qB;  // x: paired extra time %, q: per-step ratios
    Split sp1, spB;
    const std::vector<int> sizes = o->batch > 1 ? std::vector<int>{1, o->batch} : std::vector<int>{1};
    for (int r = 0; r < o->reps; ++r) {
      for (int B : sizes) {
        Pair p = decode_pair(B, B == 1 ? &sp1 : &spB);
        (B == 1 ? d1s : dBs).push_back(p.base_tok_s);
        if (experts || trex) {
          (B == 1 ? e1s : eBs).push_back(p.experts_tok_s);
          (B == 1 ? x1s : xBs).push_back(100.0 * (p.base_tok_s / p.experts_tok_s - 1));
          auto& q = B == 1 ? q1 : qB;
          q.insert(q.end(), p.ratios.begin(), p.ratios.end());
        }
      }
    }
    auto median = [](std::vector<double> v) {
      if (v.empty()) return 0.0;
      std::sort(v.begin(), v.end());
      return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
    };
    auto range = [](const std::vector<double>& v) {
      return v.empty() ? std::string()
                       : fmt::format("{:.1f}-{:.1f}", *std::min_element(v.begin(), v.end()),
                                     *std::max_element(v.begin(), v.end()));
    };
    if (o->batch == 1) {  // --batch 1: the batched measurement is the batch-1 one
      dBs = d1s, eBs = e1s, xBs = x1s, qB = q1;
      spB = sp1;
    }
    const double d1 = median(d1s), dB = median(dBs), e1 = median(e1s), eB = median(eBs);
    // Before the bandwidth probe's own 256 MiB buffer; with a bundle it includes both sets of
    // KV caches (base and experts sequences are live at once).
    double rss = double(peak_rss_kib()) / 1024.0;
    // The floor's bandwidth where the weights live: host reads, or the device's own copy
    // (read + write bytes).
    double bw = device ? measure_device_bandwidth(*device) : measure_bandwidth(pool);
    double wbytes = double(m->weight_bytes());
    double floor_tps = bw * 1e9 / wbytes;
    std::cout << "model        " << model_path << "\n"
              << "dtype        " << dtype_name(m->dtype()) << "   threads " << pool.size() << "   isa "
              << cpu::isa_name(cpu::best_isa()) << "   gemv prefetch " << (cpu::gemv_prefetch() ? "on" : "off") << "\n"
              << "device       " << m->backend().description() << "\n";
    std::cout << fmt::format("prefill      {:>9.1f} tok/s  ({}-token prompt)\n", prefill_best, o->prompt);
    std::cout << fmt::format("decode b=1   {:>9.1f} tok/s  (median of {}, range {})\n", d1, d1s.size(), range(d1s));
    if (o->batch > 1)
      std::cout << fmt::format("decode b={:<3} {:>9.1f} tok/s  ({:.2f}x batch 1; range {})\n", o->batch, dB, dB / d1,
                               range(dBs));
    if (experts || trex) {
      std::cout << fmt::format(
          "experts      {} ({})\n", o->bundle,
          experts ? fmt::format("{} experts in {} groups", experts->n_experts(), bundle->groups.size())
                  : fmt::format("t-rex {}, {} rank-1 experts per module", trex->adapter().mode, trex->adapter().E));
      auto split = [&](const Split& sp) {
        const double n = double(std::max<int64_t>(1, sp.steps)), ms = 1e3 / n;
        return fmt::format("step {:.2f} ms: route {:.2f} + post {:.2f} + wait {:.2f} ms{}", sp.total * ms,
                           sp.route * ms, sp.post * ms, sp.wait * ms,
                           remote ? fmt::format(" (workers computed {:.2f} ms)", sp.worker_apply * ms) : std::string());
      };
      // The extra time is the median over reps of the paired steps' ratio (range over reps); the
      // median step's ratio beside it discounts the odd step a neighbour's burst slowed.
      auto extra = [&](const std::vector<double>& x, const std::vector<double>& q) {
        if (x.empty() || q.empty()) return std::string("no paired steps");
        return fmt::format("{:+.1f}% time vs base, paired steps; range {:+.1f} to {:+.1f}, median step {:+.1f}%",
                           median(x), *std::min_element(x.begin(), x.end()), *std::max_element(x.begin(), x.end()),
                           100.0 * (median(q) - 1));
      };
      std::cout << fmt::format("  decode b=1   {:>9.1f} tok/s  ({})\n", e1, extra(x1s, q1));
      std::cout << fmt::format("               {}\n", split(sp1));
      if (o->batch > 1) {
        std::cout << fmt::format("  decode b={:<3} {:>9.1f} tok/s  ({})\n", o->batch, eB, extra(xBs, qB));
        std::cout << fmt::format("               {}\n", split(spB));
      }
      if (MpiSession* s = MpiSession::get(); s && s->size() > 1)
        std::cout << fmt::format("ranks        {} (rank 0 + {} expert workers)\n", s->size(), s->size() - 1);
    }
    std::cout << fmt::format("bandwidth    {:>9.2f} GB/s (measured read)\n", bw);
    std::cout << fmt::format("weights/step {:>9.1f} MiB -> floor {:.1f} tok/s at batch 1; b=1 reaches {:.0f}% of it\n",
                             wbytes / (1 << 20), floor_tps, 100.0 * d1 / floor_tps);
    std::cout << fmt::format("peak RSS     {:>9.1f} MiB{}\n", rss,
                             experts || trex ? " (with the paired runs' two sets of KV caches)" : "");
    if (!o->json.empty()) {
      nlohmann::json j = {{"model", model_path},
                          {"dtype", dtype_name(m->dtype())},
                          {"threads", pool.size()},
                          {"isa", cpu::isa_name(cpu::best_isa())},
                          {"gemv_prefetch", cpu::gemv_prefetch()},
                          {"device", m->backend().description()},
                          {"prefill_tok_s", prefill_best},
                          {"prompt_tokens", o->prompt},
                          {"decode_b1_tok_s", d1},
                          {"batch", o->batch},
                          {"decode_batch_tok_s", dB},
                          {"bandwidth_gb_s", bw},
                          {"weight_bytes", wbytes},
                          {"floor_b1_tok_s", floor_tps},
                          {"peak_rss_mib", rss}};
      if (experts || trex) {
        j["bundle"] = o->bundle;
        j["n_experts"] = experts ? experts->n_experts() : trex->adapter().E;
        j["experts_decode_b1_tok_s"] = e1;
        j["experts_decode_batch_tok_s"] = eB;
        j["samples"] = {{"decode_b1", d1s},   {"decode_batch", dBs},      {"experts_b1", e1s},
                        {"experts_batch", eBs}, {"extra_time_pct_b1", x1s}, {"extra_time_pct_batch", xBs}};
        j["experts_b1_extra_time_pct"] = median(x1s);
        j["experts_batch_extra_time_pct"] = median(xBs);
        j["experts_b1_step_ratio_median"] = median(q1);
        j["experts_batch_step_ratio_median"] = median(qB);
        auto sj = [](const Split& sp) {
          const double n = double(std::max<int64_t>(1, sp.steps));
          return nlohmann::json{{"step_ms", sp.total * 1e3 / n},
                                {"route_ms", sp.route * 1e3 / n},
                                {"post_ms", sp.post * 1e3 / n},
                                {"wait_ms", sp.wait * 1e3 / n},
                                {"worker_apply_ms", sp.worker_apply * 1e3 / n},
                                {"plane_bytes_per_step", double(sp.bytes) / n}};
        };
        j["split_b1"] = sj(sp1);
        j["split_batch"] = sj(spB);
        if (remote) {
          j["worker_stats"] = remote->worker_stats();
          j["bytes_sent_to_workers"] = remote->bytes_sent();
        }
        MpiSession* s = MpiSession::get();
        j["ranks"] = s ? s->size() : 1;
        j["spread_groups"] = o->spread;
      }
      write_file(o->json, j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n", "--json");
    }
    return 0;
  };
}

}  // namespace atmoe::app
