#include "worker/worker_loop.h"

#include <csignal>

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>

#include "common/bundle.h"
#include "common/clock.h"
#include "common/comm_mpi.h"
#include "common/log.h"
#include "common/wire.h"
#include "kernels/thread_pool.h"
#include "worker/expert_shard.h"

namespace atmoe {

namespace {
using json = nlohmann::json;

struct Session {
  std::unique_ptr<ExpertShard> shard;
  std::vector<float> coef;
  int coef_layer = -1, coef_cols = 0;
  uint64_t coef_step = 0;
  int64_t work_messages = 0;
  double apply_s = 0;  // time in ExpertShard::apply
  std::vector<uint8_t> result;
  // Run-time adapters (coefficient columns after the shard's, in this order).
  std::vector<std::pair<int, std::unique_ptr<ExpertShard>>> adapters;
};

json inputs_json(const ExpertShard& sh) {
  const int L = sh.spec().shapes.n_layers;
  std::vector<int> inputs(size_t(L) * kNumSiteInputs);
  for (int l = 0; l < L; ++l)
    for (int i = 0; i < kNumSiteInputs; ++i) inputs[size_t(l * kNumSiteInputs + i)] = sh.has_input(l, SiteInput(i));
  return inputs;
}

// Loads the shard a Hello describes; throws InputError/CommError for the coordinator to report.
std::unique_ptr<ExpertShard> load_shard(const json& j) {
  const std::string build = j.at("build").get<std::string>();
  if (build != build_id())
    throw InputError(
        fmt::format("this rank runs {} but rank 0 runs {}: run one atmoe build on every rank", build_id(), build));
  const Bundle b = load_bundle_manifest(j.at("bundle").get<std::string>());
  const std::string fp = bundle_fingerprint(b);
  if (fp != j.at("fingerprint").get<std::string>())
    throw InputError(
        fmt::format("{}: the bundle this rank reads differs from rank 0's (fingerprint {} vs {}): give every "
                    "rank the same bundle files",
                    b.manifest, fp, j.at("fingerprint").get<std::string>()));
  ShardSpec spec;
  spec.shapes.n_layers = j.at("n_layers").get<int>();
  const auto din = j.at("d_in").get<std::vector<int64_t>>(), dout = j.at("d_out").get<std::vector<int64_t>>();
  ATMOE_ASSERT(din.size() == kNumSites && dout.size() == kNumSites);
  for (int i = 0; i < kNumSites; ++i) {
    spec.shapes.d_in[size_t(i)] = din[size_t(i)];
    spec.shapes.d_out[size_t(i)] = dout[size_t(i)];
  }
  spec.head_dim = j.at("head_dim").get<int64_t>();
  spec.permute_qk = j.at("permute_qk").get<bool>();
  spec.dtype = j.at("dtype").get<std::string>() == "bf16" ? DType::BF16 : DType::F32;
  spec.groups = j.at("groups").get<std::vector<int>>();
  spec.general = j.at("general").get<bool>();
  for (int g : spec.groups) ATMOE_ASSERT(g >= 0 && g < int(b.groups.size()));
  ATMOE_ASSERT(!spec.general || b.general.has_value());
  return std::make_unique<ExpertShard>(b, spec);
}

json ready_json(const MpiSession& s, const ExpertShard* shard) {
  json r;
  r["ok"] = shard != nullptr;
  r["host"] = s.host();
  r["pid"] = int64_t(::getpid());
  r["threads"] = ThreadPool::global().size();
  r["build"] = build_id();
  if (shard) {
    r["bytes"] = shard->bytes();
    r["columns"] = shard->column_expert();
    r["inputs"] = inputs_json(*shard);
  }
  return r;
}

// A run-time adapter loaded (as the shard's next coefficient column) or dropped; the
// reply says whether, and the (layer, input)s the adapter has rows for.
json adapter_message(Session& ss, const WireHeader& h, const json& j) {
  json r{{"ok", false}};
  try {
    const int col = j.at("col").get<int>();
    if (h.kind == uint16_t(Msg::LoadAdapter)) {
      auto sh = adapter_shard(ss.shard->spec(), j.at("name").get<std::string>(), j.at("dir").get<std::string>());
      r["inputs"] = inputs_json(*sh);
      r["bytes"] = sh->bytes();
      ss.adapters.emplace_back(col, std::move(sh));
    } else {
      auto it = std::find_if(ss.adapters.begin(), ss.adapters.end(), [&](const auto& a) { return a.first == col; });
      if (it != ss.adapters.end()) {
        r["bytes"] = it->second->bytes();
        ss.adapters.erase(it);
      }
    }
    r["ok"] = true;
  } catch (const std::exception& e) {
    r["error"] = e.what();
  }
  return r;
}

json stats_json(MpiSession& s, const Session& ss) {
  json r;
  r["work_messages"] = ss.work_messages;
  r["apply_s"] = ss.apply_s;
  r["applies"] = ss.shard ? ss.shard->counters().applies : 0;
  r["token_rows"] = ss.shard ? ss.shard->counters().token_rows : 0;
  r["data_bytes_received"] = s.data().bytes_received();
  r["data_bytes_sent"] = s.data().bytes_sent();
  r["shard_bytes"] = ss.shard ? ss.shard->bytes() : 0;
  r["peak_rss_kib"] = peak_rss_kib();
  return r;
}

void send_ctrl(MpiSession& s, Msg kind, const json& j) {
  auto m = wire_json_message(kind, j);
  std::vector<Communicator::Request> rq{s.ctrl().isend(m.data(), m.size(), 0, kTagCtrl)};
  s.ctrl().wait_all(rq, 0);
}

// One Work message: [T, C] coefficients (C > 0), [T, d_in] activations -> [T, out] partial sums.
void do_work(MpiSession& s, Session& ss, const std::vector<uint8_t>& m, const WireHeader& h) {
  const std::string from = s.data().describe(0);
  if (!ss.shard) throw CommError(fmt::format("{} sent work before a hello", from), 0);
  const ExpertShard& sh = *ss.shard;
  if (h.input < 0 || h.input >= kNumSiteInputs || h.layer < 0 || h.layer >= sh.spec().shapes.n_layers || h.rows <= 0 ||
      h.cols < 0)
    throw CommError(
        fmt::format("{} sent work for layer {} input {} rows {}: out of range", from, h.layer, h.input, h.rows), 0);
  const SiteInput in = SiteInput(h.input);
  const int64_t T = h.rows, din = sh.d_in(in), out = sh.out_cols(in);
  const size_t want = sizeof(WireHeader) + size_t(T) * size_t(h.cols + din) * 4;
  if (m.size() != want)
    throw CommError(fmt::format("{} sent {} bytes of work, expected {} for {} rows", from, m.size(), want, T), 0);
  const float* payload = reinterpret_cast<const float*>(m.data() + sizeof(WireHeader));
  if (h.cols > 0) {
    const int cols = sh.n_columns() + int(ss.adapters.size());
    if (h.cols != cols)
      throw CommError(fmt::format("{} sent {} coefficient columns, this worker holds {} experts", from, h.cols, cols),
                      0);
    ss.coef.assign(payload, payload + T * h.cols);
    ss.coef_layer = h.layer;
    ss.coef_step = h.step;
    ss.coef_cols = h.cols;
    payload += T * h.cols;
  } else if (ss.coef_layer != h.layer || ss.coef_step != h.step || int64_t(ss.coef.size()) != T * ss.coef_cols) {
    throw CommError(fmt::format("{} sent work for layer {} without its coefficients", from, h.layer), 0);
  }
  ss.result.assign(sizeof(WireHeader) + size_t(T * out) * 4, 0);
  WireHeader rh = h;
  rh.kind = uint16_t(Msg::Result);
  rh.cols = int32_t(out);
  std::memcpy(ss.result.data(), &rh, sizeof rh);
  float* y = reinterpret_cast<float*>(ss.result.data() + sizeof(WireHeader));
  const double t0 = now_s();
  sh.apply(h.layer, in, payload, din, ss.coef.data(), ss.coef_cols, y, out, T);
  for (size_t k = 0; k < ss.adapters.size(); ++k)
    ss.adapters[k].second->apply(h.layer, in, payload, din, ss.coef.data() + sh.n_columns() + int64_t(k), ss.coef_cols,
                                 y, out, T);
  ss.apply_s += now_s() - t0;
  ++ss.work_messages;
  std::vector<Communicator::Request> rq{s.data().isend(ss.result.data(), ss.result.size(), 0, kTagResult)};
  s.data().wait_all(rq, 0);
}
}  // namespace

int run_worker(MpiSession& s) {
  auto log = ATMOE_LOG("worker");
  std::vector<uint8_t> m;
  for (;;) {
    // Between sessions: a hello, or the final shutdown.
    s.ctrl().recv(m, 0, kTagCtrl, 0);
    const std::string from = s.ctrl().describe(0);
    Session ss;
    WireHeader h;
    try {
      h = wire_header(m, from);
    } catch (const CommError& e) {
      json r = ready_json(s, nullptr);
      r["error"] = e.what();
      r["exit_code"] = 2;
      send_ctrl(s, Msg::Ready, r);
      continue;
    }
    if (h.kind == uint16_t(Msg::Shutdown)) {
      const json j = wire_json(m, from);
      if (j.value("final", true)) return j.value("code", 0);
      continue;
    }
    if (h.kind == uint16_t(Msg::Stats)) {
      send_ctrl(s, Msg::StatsReply, stats_json(s, ss));
      continue;
    }
    if (h.kind != uint16_t(Msg::Hello)) continue;
    bool ignore_term = false;
    try {
      const json hello = wire_json(m, from);
      ss.shard = load_shard(hello);
      // A server drains on SIGTERM (srun/scancel signal every task): its workers keep
      // serving until the coordinator ends the session.
      ignore_term = hello.value("ignore_sigterm", false);
      if (ignore_term) std::signal(SIGTERM, SIG_IGN);
      send_ctrl(s, Msg::Ready, ready_json(s, ss.shard.get()));
    } catch (const Error& e) {
      json r = ready_json(s, nullptr);
      r["error"] = e.what();
      r["exit_code"] = e.exit_code();
      send_ctrl(s, Msg::Ready, r);
      continue;  // the coordinator ends the session
    } catch (const std::exception& e) {
      json r = ready_json(s, nullptr);
      r["error"] = e.what();
      r["exit_code"] = 1;
      send_ctrl(s, Msg::Ready, r);
      continue;
    }
    // Serve the session: work on the data communicator, control on its own.
    bool final = false;
    int code = 0;
    double last_active = now_s();
    for (bool live = true; live;) {
      bool idle = true;
      if (s.data().probe(0, kTagWork)) {
        idle = false;
        s.data().recv(m, 0, kTagWork, 0);
        do_work(s, ss, m, wire_header(m, s.data().describe(0)));
      }
      if (s.ctrl().probe(0, kTagCtrl)) {
        idle = false;
        s.ctrl().recv(m, 0, kTagCtrl, 0);
        const WireHeader ch = wire_header(m, from);
        if (ch.kind == uint16_t(Msg::Stats)) {
          send_ctrl(s, Msg::StatsReply, stats_json(s, ss));
        } else if (ch.kind == uint16_t(Msg::LoadAdapter) || ch.kind == uint16_t(Msg::UnloadAdapter)) {
          send_ctrl(s, Msg::AdapterReply, adapter_message(ss, ch, wire_json(m, from)));
        } else if (ch.kind == uint16_t(Msg::Shutdown)) {
          const json j = wire_json(m, from);
          final = j.value("final", true);
          code = j.value("code", 0);
          live = false;
        }
      }
      // Idle pacing: poll hot for 200 µs after the last message (the next site input of a
      // step follows within microseconds), then yield the core, then sleep 50 µs per poll
      // so an idle worker (a server between requests) costs nothing.
      const double t = now_s();
      if (!idle) {
        last_active = t;
      } else if (t - last_active > 20e-3) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      } else if (t - last_active > 200e-6) {
        sched_yield();
      }
    }
    if (ignore_term) std::signal(SIGTERM, SIG_DFL);
    log->debug("session ended: {} work messages", ss.work_messages);
    if (final) return code;
  }
}

}  // namespace atmoe
