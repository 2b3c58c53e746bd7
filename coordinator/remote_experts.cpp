#include "coordinator/remote_experts.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/env.h"
#include "common/log.h"
#include "common/wire.h"
#include "kernels/thread_pool.h"
#include "worker/expert_shard.h"

namespace atmoe {

using json = nlohmann::json;

namespace {
void send_ctrl(MpiSession& s, int rank, Msg kind, const json& j) {
  auto m = wire_json_message(kind, j);
  std::vector<Communicator::Request> rq{s.ctrl().isend(m.data(), m.size(), rank, kTagCtrl)};
  s.ctrl().wait_all(rq, double(env_int("ATMOE_WORKER_TIMEOUT")));
}
bool g_workers_ended = false;
}  // namespace

bool end_workers(MpiSession& s, int code) {
  if (g_workers_ended) return true;
  g_workers_ended = true;
  bool all = true;
  for (int r = 1; r < s.size(); ++r) {
    auto m = wire_json_message(Msg::Shutdown, json{{"code", code}, {"final", true}});
    std::vector<Communicator::Request> rq{s.ctrl().isend(m.data(), m.size(), r, kTagCtrl)};
    try {
      s.ctrl().wait_all(rq, 5.0);
    } catch (const CommError&) {
      all = false;  // a worker that cannot take its shutdown: MPI_Finalize would wait for it
    }
  }
  return all;
}

RemoteExperts::RemoteExperts(MpiSession& s, const Bundle& b, const ModelConfig& c, DType dtype, const Placement& p,
                             bool workers_ignore_sigterm)
    : s_(s), shapes_(site_shapes(c)) {
  ATMOE_ASSERT(s.rank() == 0 && p.n_workers() == s.size() - 1);
  worker_timeout_ = double(env_int("ATMOE_WORKER_TIMEOUT"));
  poll_ = env_str("ATMOE_MPI_PROGRESS") == "poll";
  const double load_timeout = double(env_int("ATMOE_LOAD_TIMEOUT"));
  load_timeout_ = load_timeout;
  const std::string fp = bundle_fingerprint(b);
  json base;
  base["build"] = build_id();
  base["bundle"] = b.dir;
  base["fingerprint"] = fp;
  base["dtype"] = dtype == DType::BF16 ? "bf16" : "f32";
  base["n_layers"] = c.n_layers;
  base["d_in"] = std::vector<int64_t>(shapes_.d_in.begin(), shapes_.d_in.end());
  base["d_out"] = std::vector<int64_t>(shapes_.d_out.begin(), shapes_.d_out.end());
  base["head_dim"] = c.head_dim;
  base["permute_qk"] = c.rope_style == RopeStyle::Interleaved;
  base["ignore_sigterm"] = workers_ignore_sigterm;
  const int nw = p.n_workers();
  w_.resize(size_t(nw));
  ready_.resize(size_t(nw));
  sent_.assign(size_t(nw), 0);
  received_.assign(size_t(nw), 0);
  for (int w = 0; w < nw; ++w) {
    json h = base;
    h["groups"] = p.groups[size_t(w)];
    h["general"] = p.general_worker == w;
    w_[size_t(w)].rank = w + 1;
    w_[size_t(w)].groups = p.groups[size_t(w)];
    send_ctrl(s, w + 1, Msg::Hello, h);
  }
  // Every Ready, in any order; the first failure is reported once, naming its rank.
  std::string first_error;
  int first_code = 0;
  std::vector<uint8_t> m;
  for (int k = 0; k < nw; ++k) {
    int src;
    try {
      src = s.ctrl().recv(m, -1, kTagCtrl, load_timeout);
    } catch (const PeerTimeout&) {
      std::string missing;
      for (int w = 0; w < nw; ++w)
        if (ready_[size_t(w)].is_null()) missing += (missing.empty() ? "" : ", ") + s.ctrl().describe(w + 1);
      throw PeerTimeout(fmt::format("{} did not finish loading its experts within {:g} s (ATMOE_LOAD_TIMEOUT)", missing,
                                    load_timeout),
                        -1);
    }
    const std::string who = s.ctrl().describe(src);
    if (src < 1 || src > nw || !ready_[size_t(src - 1)].is_null())
      throw CommError(fmt::format("{} sent an unexpected Ready", who), src);
    json r;
    try {
      const WireHeader h = wire_header(m, who);
      ATMOE_ASSERT(h.kind == uint16_t(Msg::Ready));
      r = wire_json(m, who);
    } catch (const CommError& e) {
      r = json{{"ok", false}, {"error", e.what()}, {"exit_code", 1}};
    }
    ready_[size_t(src - 1)] = r;
    if (!r.value("ok", false)) {
      if (first_error.empty()) {
        first_error = fmt::format("{}: {}", who, r.value("error", std::string("failed")));
        first_code = r.value("exit_code", 1);
      }
      continue;
    }
    Worker& wk = w_[size_t(src - 1)];
    try {
      wk.columns = r.at("columns").get<std::vector<int>>();
      const auto inputs = r.at("inputs").get<std::vector<int>>();
      wk.inputs.assign(inputs.begin(), inputs.end());
      wk.base_inputs = wk.inputs;
      wk.bytes = r.value("bytes", int64_t(0));
    } catch (const json::exception& e) {
      throw CommError(fmt::format("{} sent a malformed Ready: {}", who, e.what()), src);
    }
    const int E = int(b.experts.size());
    const bool general = p.general_worker == src - 1;
    if (wk.inputs.size() != size_t(c.n_layers) * kNumSiteInputs)
      throw CommError(fmt::format("{} reports {} (layer, input) entries, expected {}", who, wk.inputs.size(),
                                  size_t(c.n_layers) * kNumSiteInputs),
                      src);
    for (int e : wk.columns)
      if (e < 0 || e > E || (e == E && !general))
        throw CommError(fmt::format("{} reports expert column {} outside 0..{}", who, e, general ? E : E - 1), src);
    ATMOE_LOG("coord")->info("{} holds {} experts, {:.1f} MiB, {} threads", who, wk.columns.size(),
                             double(r.value("bytes", int64_t(0))) / (1 << 20), r.value("threads", 0));
  }
  std::vector<std::pair<int, long>> pids;
  for (int w = 0; w < nw; ++w) pids.emplace_back(w + 1, ready_[size_t(w)].value("pid", 0L));
  s.watch_workers(pids);
  if (!first_error.empty()) {
    ended_ = true;
    // The workers that did load are in a session: end it before reporting.
    for (int w = 0; w < nw; ++w)
      if (ready_[size_t(w)].value("ok", false)) {
        try {
          send_ctrl(s, w + 1, Msg::Shutdown, json{{"code", 0}, {"final", false}});
        } catch (const CommError&) {
        }
      }
    if (first_code == 2) throw InputError(first_error);
    throw RuntimeError(first_error);
  }
}

RemoteExperts::~RemoteExperts() {
  ThreadPool::global().set_progress_hook(nullptr);
  if (failed_) {
    // Requests may still own w_'s buffers (a timed-out worker can answer late): the job is
    // about to abort, so they are leaked, not freed under MPI's feet.
    new std::vector<Worker>(std::move(w_));
    return;
  }
  if (ended_) return;
  try {
    for (const auto& wk : w_) send_ctrl(s_, wk.rank, Msg::Shutdown, json{{"code", 0}, {"final", false}});
  } catch (const Error&) {
  }
}

int64_t RemoteExperts::out_cols(SiteInput in) const {
  int64_t n = 0;
  for (int i = 0; i < input_site_count(in); ++i) n += shapes_.d_out[size_t(int(input_first_site(in)) + i)];
  return n;
}

void RemoteExperts::set_layer(int layer, const StepRouting& r) {
  (void)layer;
  for (Worker& wk : w_) {
    wk.toks.clear();
    wk.coef.clear();
    wk.coef_sent = false;
    const size_t nc = wk.columns.size();
    for (int64_t t = 0; t < r.T; ++t) {
      const float* ct = r.coef.data() + t * r.C;
      bool any = false;
      for (int e : wk.columns)
        if (ct[e] != 0.f) {
          any = true;
          break;
        }
      if (!any) continue;
      wk.toks.push_back(int32_t(t));
      for (size_t c = 0; c < nc; ++c) wk.coef.push_back(ct[wk.columns[c]]);
    }
  }
}

void RemoteExperts::post(int layer, SiteInput in, const float* x, int64_t ldx, const StepRouting& r) {
  (void)r;
  const int64_t din = d_in(in), out = out_cols(in);
  if (!reqs_.empty()) {  // a wait that never ran (an exception between post and wait)
    failed_ = true;
    s_.data().wait_all(reqs_, worker_timeout_);
    failed_ = false;
  }
  // Every message's size is checked before any is posted (MPI counts are int).
  for (const Worker& wk : w_) {
    const int64_t T = int64_t(wk.toks.size()), C = wk.coef_sent ? 0 : int64_t(wk.columns.size());
    const int64_t bytes = int64_t(sizeof(WireHeader)) + T * std::max(C + din, out) * 4;
    if (T > 0 && bytes > INT32_MAX)
      throw InputError(
          fmt::format("layer {} {}: {} tokens make a {}-byte message to {}, over MPI's 2 GiB: give fewer "
                      "tokens per step (shorter prompts or a smaller batch)",
                      layer, site_input_name(in), T, bytes, s_.data().describe(wk.rank)));
  }
  for (size_t w = 0; w < w_.size(); ++w) {
    Worker& wk = w_[w];
    wk.in_flight = false;
    if (wk.toks.empty() || !wk.inputs[size_t(layer * kNumSiteInputs + int(in))]) continue;
    const int64_t T = int64_t(wk.toks.size());
    const int64_t C = wk.coef_sent ? 0 : int64_t(wk.columns.size());
    WireHeader h;
    h.kind = uint16_t(Msg::Work);
    h.step = step_;
    h.layer = layer;
    h.input = int(in);
    h.rows = int32_t(T);
    h.cols = int32_t(C);
    wk.msg.resize(sizeof h + size_t(T * (C + din)) * 4);
    std::memcpy(wk.msg.data(), &h, sizeof h);
    float* p = reinterpret_cast<float*>(wk.msg.data() + sizeof h);
    if (C) {
      std::memcpy(p, wk.coef.data(), size_t(T * C) * 4);
      p += T * C;
      wk.coef_sent = true;
    }
    for (int64_t j = 0; j < T; ++j) std::memcpy(p + j * din, x + int64_t(wk.toks[size_t(j)]) * ldx, size_t(din) * 4);
    wk.result.resize(sizeof h + size_t(T * out) * 4);
    reqs_.push_back(s_.data().irecv(wk.result.data(), wk.result.size(), wk.rank, kTagResult));
    reqs_.push_back(s_.data().isend(wk.msg.data(), wk.msg.size(), wk.rank, kTagWork));
    sent_[w] += int64_t(wk.msg.size());
    wk.in_flight = true;
  }
  // The base GEMM runs next: its calling thread advances these messages between chunks
  // (a result larger than the eager limit moves only inside MPI calls; docs/performance.md).
  if (!reqs_.empty() && poll_) ThreadPool::global().set_progress_hook([this] { s_.data().progress(reqs_); });
}

void RemoteExperts::wait(int layer, SiteInput in, float* y, int64_t ldy, const StepRouting& r) {
  (void)r;
  ThreadPool::global().set_progress_hook(nullptr);
  if (reqs_.empty()) return;
  try {
    s_.data().wait_all(reqs_, worker_timeout_);
  } catch (const PeerTimeout& e) {
    failed_ = true;
    throw PeerTimeout(fmt::format("{} (ATMOE_WORKER_TIMEOUT) during layer {} {}", e.what(), layer, site_input_name(in)),
                      e.peer());
  }
  const int64_t out = out_cols(in);
  for (Worker& wk : w_) {
    if (!wk.in_flight) continue;
    wk.in_flight = false;
    WireHeader h;
    std::memcpy(&h, wk.result.data(), sizeof h);
    if (h.magic != kWireMagic || h.version != kWireVersion || h.kind != uint16_t(Msg::Result) || h.step != step_ ||
        h.layer != layer || h.input != int(in) || h.rows != int32_t(wk.toks.size()) || h.cols != out)
      throw CommError(fmt::format("{} answered layer {} {} with a mismatched result header",
                                  s_.data().describe(wk.rank), layer, site_input_name(in)),
                      wk.rank);
    received_[size_t(&wk - w_.data())] += int64_t(sizeof h) + int64_t(wk.toks.size()) * out * int64_t(sizeof(float));
    const float* p = reinterpret_cast<const float*>(wk.result.data() + sizeof h);
    for (size_t j = 0; j < wk.toks.size(); ++j) {
      float* yr = y + int64_t(wk.toks[j]) * ldy;
      const float* pr = p + int64_t(j) * out;
      for (int64_t c = 0; c < out; ++c) yr[c] += pr[c];
    }
  }
}

json RemoteExperts::adapter_call(Worker& wk, Msg kind, const json& j) {
  send_ctrl(s_, wk.rank, kind, j);
  std::vector<uint8_t> m;
  s_.ctrl().recv(m, wk.rank, kTagCtrl, load_timeout_);
  const std::string who = s_.ctrl().describe(wk.rank);
  const WireHeader h = wire_header(m, who);
  if (h.kind != uint16_t(Msg::AdapterReply))
    throw CommError(fmt::format("{} answered an adapter message with kind {}", who, h.kind), wk.rank);
  return wire_json(m, who);
}

void RemoteExperts::refresh_inputs(Worker& wk) {
  wk.inputs = wk.base_inputs;
  for (const auto& [col, in] : wk.adapters)
    for (size_t i = 0; i < wk.inputs.size() && i < in.size(); ++i) wk.inputs[i] = uint8_t(wk.inputs[i] | in[i]);
}

std::string RemoteExperts::load_adapter(int col, const std::string& name, const std::string& dir, int group) {
  Worker* best = &w_[0];
  for (Worker& wk : w_)
    if (wk.bytes < best->bytes) best = &wk;
  for (Worker& wk : w_)
    if (std::find(wk.groups.begin(), wk.groups.end(), group) != wk.groups.end()) best = &wk;
  Worker& wk = *best;
  const json r = adapter_call(wk, Msg::LoadAdapter, json{{"col", col}, {"name", name}, {"dir", dir}});
  const std::string who = s_.ctrl().describe(wk.rank);
  if (!r.value("ok", false)) throw InputError(fmt::format("{}: {}", who, r.value("error", std::string("failed"))));
  std::vector<uint8_t> in;
  try {
    for (int v : r.at("inputs").get<std::vector<int>>()) in.push_back(uint8_t(v != 0));
  } catch (const json::exception& e) {
    throw CommError(fmt::format("{} sent a malformed adapter reply: {}", who, e.what()), wk.rank);
  }
  wk.adapters.emplace_back(col, std::move(in));
  wk.columns.push_back(col);
  wk.bytes += r.value("bytes", int64_t(0));
  refresh_inputs(wk);
  return fmt::format("rank {}", wk.rank);
}

void RemoteExperts::unload_adapter(int col) {
  for (Worker& wk : w_) {
    auto it = std::find_if(wk.adapters.begin(), wk.adapters.end(), [&](const auto& a) { return a.first == col; });
    if (it == wk.adapters.end()) continue;
    const json r = adapter_call(wk, Msg::UnloadAdapter, json{{"col", col}});
    wk.bytes -= r.value("bytes", int64_t(0));
    wk.adapters.erase(it);
    wk.columns.erase(std::find(wk.columns.begin(), wk.columns.end(), col));
    refresh_inputs(wk);
  }
}

std::vector<json> RemoteExperts::worker_stats() {
  std::vector<json> out;
  std::vector<uint8_t> m;
  for (const auto& wk : w_) {
    send_ctrl(s_, wk.rank, Msg::Stats, json::object());
    s_.ctrl().recv(m, wk.rank, kTagCtrl, worker_timeout_);
    const WireHeader h = wire_header(m, s_.ctrl().describe(wk.rank));
    ATMOE_ASSERT(h.kind == uint16_t(Msg::StatsReply));
    out.push_back(wire_json(m, s_.ctrl().describe(wk.rank)));
  }
  return out;
}

}  // namespace atmoe
