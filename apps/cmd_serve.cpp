// atmoe serve: the OpenAI-compatible HTTP server (docs/api.md).
//
// Two threads on rank 0. The IO thread (apps/http_server.cpp) reads requests, checks the
// key, parses and validates bodies (tokenizing prompts), answers what needs no model
// (/health, /v1/models, /metrics, every 4xx), and hands each valid generation request to
// the engine thread through an inbox. The engine thread (this process's main thread, the
// only one that talks MPI) owns the Scheduler: it submits, steps, cancels requests whose
// client went away, and sends text deltas and results back through the exchanges.
//
// SIGTERM/SIGINT drain: the listening socket closes, new requests on open connections get
// 503, running and queued requests finish within --drain-timeout (then are cancelled),
// then the process exits 0.
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <ctime>
#include <deque>
#include <map>
#include <mutex>
#include <filesystem>
#include <optional>
#include <random>

#include "apps/commands.h"
#include "apps/http_server.h"
#include "apps/launch.h"
#include "apps/openai_api.h"
#include "common/clock.h"
#include "common/comm_mpi.h"
#include "common/error.h"
#include "common/env.h"
#include "common/log.h"
#include "common/utf8.h"
#include "coordinator/remote_experts.h"
#include "coordinator/scheduler.h"
#include "coordinator/trace.h"

namespace atmoe::app {

using json = nlohmann::json;

namespace {

// Set by the handler on whichever thread takes the signal, read by the engine loop.
std::atomic<int> g_stop_signal{0}, g_stop_count{0};
static_assert(std::atomic<int>::is_always_lock_free, "signal handlers need lock-free atomics");
void on_stop(int sig) {
  g_stop_signal = sig;
  ++g_stop_count;
}

// A Prometheus label value: backslash, double quote and newline escaped.
std::string label(const std::string& v) {
  std::string o;
  for (char c : v) {
    if (c == '\\' || c == '"') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o += c;
  }
  return o;
}

bool same_key_ct(const std::string& a, const std::string& b);
bool bearer_ok(const std::string* auth, const std::string& key) {
  if (!auth || auth->size() < 7) return false;
  std::string scheme = auth->substr(0, 7);
  for (char& c : scheme) c = char(std::tolower(static_cast<unsigned char>(c)));
  return scheme == "bearer " && same_key_ct(auth->substr(7), key);
}

std::string error_body(int status, const std::string& msg) {
  const char* type = status == 400   ? "BadRequestError"
                     : status == 401 ? "AuthenticationError"
                     : status == 404 ? "NotFoundError"
                     : status == 405 ? "MethodNotAllowed"
                     : status == 413 ? "RequestTooLarge"
                     : status == 429 ? "RateLimitError"
                     : status == 503 ? "ServiceUnavailable"
                                     : "InternalServerError";
  return json{{"error", {{"message", msg}, {"type", type}, {"param", nullptr}, {"code", status}}}}.dump();
}

// Prometheus histogram with fixed buckets (seconds).
struct Histogram {
  std::vector<double> le;
  std::vector<uint64_t> counts;
  double sum = 0;
  uint64_t n = 0;
  explicit Histogram(std::vector<double> b) : le(std::move(b)), counts(le.size(), 0) {}
  void observe(double x) {
    for (size_t i = 0; i < le.size(); ++i)
      if (x <= le[i]) ++counts[i];
    sum += x;
    ++n;
  }
  void render(std::string& o, const char* name, const char* help) const {
    o += fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
    for (size_t i = 0; i < le.size(); ++i) o += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, le[i], counts[i]);
    o += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, n, name, sum, name, n);
  }
};

struct Metrics {
  std::mutex mu;
  std::map<std::pair<std::string, int>, uint64_t> requests;  // (endpoint, status)
  uint64_t prompt_tokens = 0, completion_tokens = 0;
  Histogram ttft{{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}};
  Histogram itl{{0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5}};
  Histogram e2e{{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}};
  std::map<std::string, std::pair<double, uint64_t>> group_weight;  // sum of request means, requests
  // The engine's gauges, copied after each step.
  size_t waiting = 0, running = 0;
  int64_t kv_reserved = 0, step_tokens = 0;
  uint64_t steps = 0;
  double step_seconds = 0;
  std::vector<json> workers;  // RemoteExperts::worker_stats, refreshed every few seconds

  void count(const std::string& endpoint, int status) {
    std::lock_guard<std::mutex> l(mu);
    ++requests[{endpoint, status}];
  }
};

// One HTTP generation request on its way through the engine.
struct Job {
  std::shared_ptr<HttpExchange> ex;
  OpenAiRequest req;
  std::string endpoint;  // /v1/completions | /v1/chat/completions
  std::string id;        // chatcmpl-... / cmpl-...
  HttpHeaders headers;   // X-Request-Id
  int64_t created = 0;
  double t_arrive = 0;
  std::atomic<bool> client_gone{false};
  // Engine thread only. One scheduler request per choice (n).
  std::vector<RequestId> rids;
  std::vector<GenerateResult> results;
  std::vector<std::vector<cpu::TokenLogprob>> unsent_lp;  // streamed: tokens not yet in a chunk
  std::vector<int64_t> text_offset;                       // streamed completions: bytes sent per choice
  std::vector<double> t_last;
  int left = 0;
  bool cancel_sent = false, drain_cancelled = false, done = false, failed = false;
  double t_first = 0;

  void cancel(Scheduler& s) {
    cancel_sent = true;
    for (RequestId id : rids) s.cancel(id);
  }
};

struct Inbox {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<Job>> jobs;
  std::deque<std::function<void()>> admin;  // load/unload adapters, between steps
  bool gone = false;          // some job's client went away: the engine looks
  std::atomic<int> pending{0};  // submitted to the engine, not finished (the IO thread's 429 bound)
};

// The paths this server answers (the label of /metrics' request counter; others are 404).
bool served_path(const std::string& path) {
  return path == "/health" || path == "/metrics" || path == "/v1/models" || path.rfind("/v1/models/", 0) == 0 ||
         path == "/v1/completions" || path == "/v1/chat/completions" || path == "/v1/load_lora_adapter" ||
         path == "/v1/unload_lora_adapter";
}
// The endpoint label of a path in /metrics: a bounded set (one label for every model id).
std::string endpoint_label(const std::string& path) {
  if (path.rfind("/v1/models/", 0) == 0) return "/v1/models/{id}";
  return served_path(path) ? path : "other";
}
constexpr const char* kNoSuchEndpoint =
    "no such endpoint (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, "
    "/v1/load_lora_adapter, /v1/unload_lora_adapter)";

std::string hex_id(std::mt19937_64& rng) { return fmt::format("{:016x}{:016x}", rng(), rng()); }

bool same_key_ct(const std::string& a, const std::string& b) {  // constant time in the key's length
  unsigned d = unsigned(a.size() != b.size());
  for (size_t i = 0; i < b.size(); ++i) d |= unsigned(uint8_t(i < a.size() ? a[i] : 0) ^ uint8_t(b[i]));
  return d == 0;
}

// One /v1/models entry, OpenAI's fields plus atmoe's.
json model_entry(const Model& m, const std::string& id, const std::string& root, const json& parent, int64_t created,
                 json ext) {
  return json{{"id", id},     {"object", "model"}, {"created", created}, {"owned_by", "atmoe"}, {"root", root},
              {"parent", parent}, {"max_model_len", m.config().max_position}, {"atmoe", std::move(ext)}};
}

json models_json(const Model& m, const ServedModels& sm, int64_t created) {
  json data = json::array();
  auto entry = [&](const std::string& id, const std::string& root, const json& parent, json ext) {
    return model_entry(m, id, root, parent, created, std::move(ext));
  };
  if (sm.bundle) {
    const Bundle& b = *sm.bundle;
    json groups = json::object();
    for (const auto& g : b.groups) {
      json names = json::array();
      for (int e : g.experts) names.push_back(b.experts[size_t(e)].name);
      groups[g.name] = names;
    }
    json ext = {{"kind", "bundle"}, {"method", b.method}, {"groups", groups}};
    if (b.general) ext["general_expert"] = b.general->name;
    data.push_back(entry(sm.bundle_id, b.dir, sm.base_id, ext));
  }
  data.push_back(entry(sm.base_id, m.info().path, nullptr, {{"kind", "base"}}));
  if (sm.bundle)
    for (const auto& e : sm.bundle->experts)
      data.push_back(entry(e.name, e.adapter_dir, sm.base_id,
                           {{"kind", "expert"}, {"group", sm.bundle->groups[size_t(e.group)].name}, {"routed", true}}));
  return {{"object", "list"}, {"data", data}};
}

std::string sse(const json& j) { return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n"; }

}  // namespace

Runner add_serve(CLI::App& app) {
  struct Opts {
    std::string model, bundle, dtype, placement, host = "127.0.0.1", api_key, adapter_root;
    int port = 8000, max_connections = 1024, max_loras = 8;
    int64_t max_queue = 256, max_body_mib = 32;
    SchedulerFlags sf;
    double timeout = 30, drain_timeout = 30;
    bool check_tensors = false;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--bundle", o->bundle, "Expert bundle directory (atmoe.json)");
  app.add_option("--model", o->model, "Model: a .gguf file or an HF directory (overrides a bundle's base_model)");
  app.add_option("--host", o->host, "Address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)");
  app.add_option("--port", o->port, "TCP port (default 8000; 0: any free port, printed at start)");
  app.add_option("--api-key", o->api_key,
                 "Require 'Authorization: Bearer KEY' on every endpoint but /health (default: $ATMOE_API_KEY)");
  add_scheduler_flags(app, o->sf);
  app.add_option("--max-queue", o->max_queue, "Requests accepted but not finished beyond --max-running (then 429)");
  app.add_option("--max-body-mib", o->max_body_mib, "Largest request body, MiB (then 413)");
  app.add_option("--max-connections", o->max_connections, "Open connections at once (then 503)");
  app.add_option("--timeout", o->timeout, "Seconds an idle keep-alive connection, a request's upload or a write may take");
  app.add_option("--drain-timeout", o->drain_timeout, "On SIGTERM: seconds the requests in flight get to finish");
  app.add_option("--adapter-root", o->adapter_root,
                 "Enable /v1/load_lora_adapter for PEFT adapters inside DIR (relative lora_path: from DIR)");
  app.add_option("--max-loras", o->max_loras, "Run-time adapters loaded at once (default 8)");
  app.add_option("--dtype", o->dtype, "Weight/compute precision: bf16 (default) or f32 (exact)");
  add_placement_flag(app, o->placement);
  app.add_flag("--check-tensors", o->check_tensors, "Check every base-model weight for NaN/Inf at load");
  return [o]() -> int {
    ATMOE_CHECK_INPUT(!o->model.empty() || !o->bundle.empty(), "serve: give --bundle DIR or --model PATH");
    ATMOE_CHECK_INPUT(o->max_loras >= 0 && o->max_loras <= 1024, "--max-loras {}: must be in 0..1024", o->max_loras);
    std::string adapter_root;
    if (!o->adapter_root.empty()) {
      std::error_code ec;
      adapter_root = std::filesystem::canonical(o->adapter_root, ec).string();
      ATMOE_CHECK_INPUT(!ec && std::filesystem::is_directory(adapter_root), "--adapter-root {}: not a directory",
                        o->adapter_root);
    }
    ATMOE_CHECK_INPUT(!o->bundle.empty() || o->placement.empty(), "--placement needs --bundle");
    ATMOE_CHECK_INPUT(o->port >= 0 && o->port <= 65535, "--port {}: must be in 0..65535", o->port);
    SchedulerOptions so = scheduler_options(o->sf);
    ATMOE_CHECK_INPUT(o->max_queue >= 0 && o->max_queue <= (1 << 20), "--max-queue {}: must be in 0..1048576",
                      o->max_queue);
    ATMOE_CHECK_INPUT(o->max_body_mib >= 1 && o->max_body_mib <= 4096, "--max-body-mib {}: must be in 1..4096",
                      o->max_body_mib);
    ATMOE_CHECK_INPUT(o->max_connections >= 1 && o->max_connections <= (1 << 20),
                      "--max-connections {}: must be in 1..1048576", o->max_connections);
    ATMOE_CHECK_INPUT(std::isfinite(o->timeout) && o->timeout > 0 && o->timeout <= 86400,
                      "--timeout {}: must be in (0, 86400] seconds", o->timeout);
    ATMOE_CHECK_INPUT(std::isfinite(o->drain_timeout) && o->drain_timeout >= 0 && o->drain_timeout <= 86400,
                      "--drain-timeout {}: must be in [0, 86400] seconds", o->drain_timeout);
    if (o->api_key.empty())
      o->api_key = env_str("ATMOE_API_KEY");

    const DType dtype = parse_dtype_flag(o->dtype);
    std::unique_ptr<Bundle> bundle;
    if (!o->bundle.empty()) bundle = std::make_unique<Bundle>(load_bundle_manifest(o->bundle));
    auto model = Model::load(o->model.empty() ? bundle->base_model : o->model, dtype, o->check_tensors);
    BundleExperts bx;
    if (bundle) bx = attach_experts(*bundle, *model, o->placement, /*drain_on_sigterm=*/true);
    RemoteExperts* remote = bx.atmoe ? dynamic_cast<RemoteExperts*>(&bx.atmoe->backend()) : nullptr;
    ExpertPool* pool = bx.atmoe.get();
    if (pool) pool->set_max_adapters(o->max_loras);
    ATMOE_CHECK_INPUT(adapter_root.empty() || pool,
                      "--adapter-root: run-time adapters need an AT-MoE bundle (--bundle; not t-rex, not --model alone)");
    const ServedModels sm = served_models(*model, bundle.get());
    so.max_queue = size_t(o->max_queue) + size_t(o->sf.max_running);
    // Held in an optional: the teardown below ends it (and the replies its requests hold)
    // while the HTTP server's io_context still exists.
    std::optional<Scheduler> sched_holder;
    sched_holder.emplace(*model, so);
    Scheduler& sched = *sched_holder;
    const int64_t started = int64_t(std::time(nullptr));
    const json models = models_json(*model, sm, started);

    Metrics metrics;
    Inbox inbox;
    std::atomic<bool> draining{false};
    std::mutex rng_mu;
    std::mt19937_64 rng(std::random_device{}());
    auto new_id = [&] {
      std::lock_guard<std::mutex> l(rng_mu);
      return hex_id(rng);
    };
    const size_t max_pending = size_t(o->max_queue) + size_t(o->sf.max_running);

    // ---- The IO thread's handler.
    auto reply = [&](const std::shared_ptr<HttpExchange>& ex, const std::string& endpoint, int status,
                     std::string body, HttpHeaders h) {
      metrics.count(endpoint, status);
      ex->respond(status, "application/json", std::move(body), std::move(h));
    };
    auto handler = [&](const std::shared_ptr<HttpExchange>& ex, HttpRequest& req) {
      std::string path = req.target.substr(0, req.target.find('?'));
      const std::string* xid = req.header("x-request-id");
      HttpHeaders hdrs{{"X-Request-Id", xid && !xid->empty() && xid->size() <= 256 ? *xid : new_id()}};
      const std::string endpoint = endpoint_label(path);
      auto fail = [&](int status, const std::string& msg) { reply(ex, endpoint, status, error_body(status, msg), hdrs); };
      if (path == "/health") {
        if (req.method != "GET" && req.method != "HEAD") return fail(405, "/health: use GET");
        metrics.count(endpoint, draining ? 503 : 200);
        return ex->respond(draining ? 503 : 200, "application/json", draining ? error_body(503, "draining") : "{}", hdrs);
      }
      // The key, and POST on the generation and admin paths, were checked from the headers (check_head).
      if (path == "/v1/models" || path.rfind("/v1/models/", 0) == 0) {
        if (req.method != "GET") return fail(405, "/v1/models: use GET");
        json ms = models;
        if (pool)
          for (const auto& a : pool->adapters()) {
            json ext = {{"kind", "adapter"}, {"routed", false}, {"where", a.where}};
            if (!a.group.empty()) ext["group"] = a.group;
            ms["data"].push_back(model_entry(*model, a.name, a.dir, sm.base_id, started, std::move(ext)));
          }
        if (path != "/v1/models") {  // GET /v1/models/{id}: one entry (the openai client's models.retrieve)
          const std::string id = path.substr(11);
          for (const auto& e : ms["data"])
            if (e["id"] == id) return reply(ex, endpoint, 200, e.dump(), hdrs);
          return fail(404, fmt::format("model \"{}\" is not served here", id));
        }
        return reply(ex, endpoint, 200, ms.dump(), hdrs);
      }
      if (path == "/v1/load_lora_adapter" || path == "/v1/unload_lora_adapter") {
        const bool load = path == "/v1/load_lora_adapter";
        if (adapter_root.empty())
          return fail(404, path + ": run-time adapters are off (start the server with --adapter-root DIR)");
        if (draining) return fail(503, "the server is shutting down");
        const json body = json::parse(req.body, nullptr, false);
        if (!body.is_object()) return fail(400, "body: not a JSON object");
        if (!body.contains("lora_name") || !body["lora_name"].is_string() || body["lora_name"].get<std::string>().empty())
          return fail(400, "body.lora_name: missing or not a non-empty string");
        const std::string name = body["lora_name"].get<std::string>();
        if (name.size() > 256 || name.find_first_of(std::string("\0\r\n\t", 4)) != std::string::npos ||
            utf8_sanitize(name) != name)
          return fail(400, "body.lora_name: at most 256 bytes of UTF-8 text, no control characters");
        if (name == sm.bundle_id || name == sm.base_id)
          return fail(400, fmt::format("body.lora_name: '{}' is the id of a served model", name));
        std::string group;
        if (body.contains("group") && !body["group"].is_null()) {  // atmoe: the adapter's target group
          if (!body["group"].is_string()) return fail(400, "body.group: must be a group name (a string)");
          group = body["group"].get<std::string>();
        }
        std::string dir;
        if (load) {
          if (!body.contains("lora_path") || !body["lora_path"].is_string() || body["lora_path"].get<std::string>().empty())
            return fail(400, "body.lora_path: missing or not a non-empty string");
          namespace fs = std::filesystem;
          fs::path p = body["lora_path"].get<std::string>();
          if (p.is_relative()) p = fs::path(adapter_root) / p;
          std::error_code ec;
          const fs::path c = fs::canonical(p, ec);
          const std::string cs = c.string();
          if (ec || (cs != adapter_root && cs.rfind(adapter_root + "/", 0) != 0))
            return fail(400, fmt::format("body.lora_path: {}: {} (adapters load from inside --adapter-root {})",
                                         body["lora_path"].get<std::string>(),
                                         ec ? "no such directory" : "outside the adapter root", adapter_root));
          if (!fs::is_directory(c, ec) || !fs::exists(c / "adapter_config.json", ec))
            return fail(400, fmt::format("body.lora_path: {}: not a PEFT adapter directory (no adapter_config.json)",
                                         body["lora_path"].get<std::string>()));
          dir = cs;
        }
        auto run = [&, ex, hdrs, endpoint, name, dir, group, load] {
          try {
            if (load) {
              pool->load_adapter(name, dir, group);
              metrics.count(endpoint, 200);
              ex->respond(200, "text/plain", fmt::format("Success: LoRA adapter '{}' added successfully.", name), hdrs);
            } else if (pool->unload_adapter(name)) {
              metrics.count(endpoint, 200);
              ex->respond(200, "text/plain", fmt::format("Success: LoRA adapter '{}' removed successfully.", name),
                          hdrs);
            } else {
              metrics.count(endpoint, 404);
              ex->respond(404, "application/json",
                          error_body(404, fmt::format("body.lora_name: the adapter '{}' is not loaded", name)), hdrs);
            }
          } catch (const InputError& e) {
            metrics.count(endpoint, 400);
            ex->respond(400, "application/json", error_body(400, e.what()), hdrs);
          } catch (const CommError&) {
            throw;  // a lost worker ends the job (its one line, then the teardown)
          } catch (const std::exception& e) {  // e.g. out of memory reading the adapter
            metrics.count(endpoint, 500);
            ex->respond(500, "application/json", error_body(500, std::string("loading the adapter failed: ") + e.what()),
                        hdrs);
          }
        };
        std::lock_guard<std::mutex> l(inbox.mu);
        inbox.admin.push_back(std::move(run));
        inbox.cv.notify_one();
        return;
      }
      if (path == "/metrics") {
        if (req.method != "GET") return fail(405, "/metrics: use GET");
        std::string text;
        {
          std::lock_guard<std::mutex> l(metrics.mu);
          ++metrics.requests[{endpoint, 200}];
          Metrics& M = metrics;
          text += "# HELP atmoe_requests_total HTTP requests by endpoint and status.\n# TYPE atmoe_requests_total counter\n";
          for (const auto& [k, n] : M.requests)
            text += fmt::format("atmoe_requests_total{{endpoint=\"{}\",status=\"{}\"}} {}\n", label(k.first), k.second, n);
          text += fmt::format(
              "# HELP atmoe_prompt_tokens_total Prompt tokens of finished requests.\n# TYPE atmoe_prompt_tokens_total "
              "counter\natmoe_prompt_tokens_total {}\n# HELP atmoe_completion_tokens_total Generated tokens.\n# TYPE "
              "atmoe_completion_tokens_total counter\natmoe_completion_tokens_total {}\n",
              M.prompt_tokens, M.completion_tokens);
          M.ttft.render(text, "atmoe_time_to_first_token_seconds", "From the request's arrival to its first token.");
          M.itl.render(text, "atmoe_inter_token_latency_seconds", "Between consecutive tokens of one request.");
          M.e2e.render(text, "atmoe_request_latency_seconds", "From arrival to the finished reply.");
          text += fmt::format(
              "# HELP atmoe_queue_depth Requests waiting for admission.\n# TYPE atmoe_queue_depth gauge\n"
              "atmoe_queue_depth {}\n# HELP atmoe_running_requests Requests in the running batch.\n# TYPE "
              "atmoe_running_requests gauge\natmoe_running_requests {}\n# HELP atmoe_kv_cache_reserved_bytes KV cache "
              "held by running requests.\n# TYPE atmoe_kv_cache_reserved_bytes gauge\natmoe_kv_cache_reserved_bytes {}\n"
              "# HELP atmoe_step_tokens Tokens in the last forward step.\n# TYPE atmoe_step_tokens gauge\n"
              "atmoe_step_tokens {}\n# HELP atmoe_steps_total Forward steps.\n# TYPE atmoe_steps_total counter\n"
              "atmoe_steps_total {}\n# HELP atmoe_step_seconds_total Time in forward steps.\n# TYPE "
              "atmoe_step_seconds_total counter\natmoe_step_seconds_total {}\n",
              M.waiting + size_t(std::max(0, inbox.pending.load() - int(M.waiting + M.running))), M.running,
              M.kv_reserved, M.step_tokens, M.steps, M.step_seconds);
          if (!M.group_weight.empty()) {
            text += "# HELP atmoe_routing_group_weight Mean routing weight per group over finished requests.\n# TYPE "
                    "atmoe_routing_group_weight gauge\n";
            for (const auto& [g, sw] : M.group_weight)
              text += fmt::format("atmoe_routing_group_weight{{group=\"{}\"}} {}\n", label(g),
                                  sw.second ? sw.first / double(sw.second) : 0.0);
          }
          if (!M.workers.empty()) {
            text += "# HELP atmoe_worker_apply_seconds_total Time each worker spent computing expert deltas.\n# TYPE "
                    "atmoe_worker_apply_seconds_total counter\n";
            for (size_t w = 0; w < M.workers.size(); ++w)
              text += fmt::format("atmoe_worker_apply_seconds_total{{rank=\"{}\"}} {}\n", w + 1,
                                  M.workers[w].value("apply_s", 0.0));
            text += "# HELP atmoe_worker_applies_total Expert applications (site inputs) per worker.\n# TYPE "
                    "atmoe_worker_applies_total counter\n";
            for (size_t w = 0; w < M.workers.size(); ++w)
              text += fmt::format("atmoe_worker_applies_total{{rank=\"{}\"}} {}\n", w + 1,
                                  M.workers[w].value("applies", int64_t(0)));
          }
        }
        return ex->respond(200, "text/plain; version=0.0.4", std::move(text), hdrs);
      }
      if (path != "/v1/completions" && path != "/v1/chat/completions")
        return fail(404, path + ": " + kNoSuchEndpoint);
      if (draining) return fail(503, "the server is shutting down");
      json body;
      try {
        body = json::parse(req.body);
      } catch (const json::exception& e) {  // syntax, invalid UTF-8, a number beyond double
        // "[json.exception.parse_error.101] parse error at line 1, column 5: <why>; last read: ..."
        std::string why = e.what();
        why = why.substr(0, why.find("; last read"));
        if (const size_t c = why.find("] "); c != std::string::npos) why = why.substr(c + 2);
        return fail(400, "body: not valid JSON: " + why);
      }
      auto job = std::make_shared<Job>();
      try {
        job->req = parse_openai_request(body, parse_endpoint(path), *model, sm, 0);
        if (!body.contains("seed") || body["seed"].is_null()) {
          std::lock_guard<std::mutex> l(rng_mu);
          job->req.gen.seed = rng();
        }
        check_kv_budget(sched, job->req.gen, o->sf.kv_budget_mib);
      } catch (const NotFoundError& e) {
        return fail(404, e.what());
      } catch (const InputError& e) {
        return fail(400, e.what());
      }
      if (inbox.pending.load() >= int(max_pending))
        return fail(429, fmt::format("the server is busy: {} requests in flight (--max-running {} + --max-queue {})",
                                     inbox.pending.load(), o->sf.max_running, o->max_queue));
      job->ex = ex;
      job->endpoint = path;
      job->id = (path == "/v1/chat/completions" ? "chatcmpl-" : "cmpl-") + new_id();
      job->headers = hdrs;
      job->created = int64_t(std::time(nullptr));
      job->t_arrive = now_s();
      std::weak_ptr<Job> wj = job;
      ex->on_client_gone([&inbox, wj] {
        if (auto j = wj.lock()) {
          j->client_gone = true;
          std::lock_guard<std::mutex> l(inbox.mu);
          inbox.gone = true;
          inbox.cv.notify_one();
        }
      });
      ++inbox.pending;
      std::lock_guard<std::mutex> l(inbox.mu);
      inbox.jobs.push_back(std::move(job));
      inbox.cv.notify_one();
    };

    HttpServerOptions ho;
    ho.host = o->host;
    ho.port = o->port;
    ho.body_limit = size_t(o->max_body_mib) << 20;
    ho.timeout_s = o->timeout;
    ho.max_connections = o->max_connections;
    ho.error_body = error_body;
    ho.on_transport_reply = [&](int status) { metrics.count("other", status); };
    // Before a body is read: the key, the path and the method.
    ho.check_head = [&](const HttpRequest& h, std::string& body) -> int {
      const std::string path = h.target.substr(0, h.target.find('?'));
      if (path == "/health") return 0;
      int st = 0;
      std::string msg;
      if (!o->api_key.empty() && !bearer_ok(h.header("authorization"), o->api_key)) {
        st = 401;
        msg = "missing or wrong API key (send 'Authorization: Bearer <key>')";
      } else if ((path == "/v1/completions" || path == "/v1/chat/completions" || path == "/v1/load_lora_adapter" ||
                  path == "/v1/unload_lora_adapter") &&
                 h.method != "POST") {
        st = 405;
        msg = path + ": use POST";
      } else if (!served_path(path)) {
        st = 404;
        msg = path + ": " + kNoSuchEndpoint;
      }
      if (st) {
        metrics.count(endpoint_label(path), st);
        body = error_body(st, msg);
      }
      return st;
    };
    HttpServer server(ho, handler);
    // However this function ends (a drain, a worker lost mid-step), the IO thread stops
    // first, then every request and reply it could reach goes, then the server object.
    struct Teardown {
      std::function<void()> f;
      ~Teardown() { f(); }
    } teardown{[&] {
      server.stop();
      {
        std::lock_guard<std::mutex> l(inbox.mu);
        inbox.jobs.clear();
        inbox.admin.clear();
      }
      sched_holder.reset();
    }};

    struct sigaction sa {}, old_term {}, old_int {};
    sa.sa_handler = on_stop;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGINT, &sa, &old_int);
    std::signal(SIGPIPE, SIG_IGN);
    {  // the IO thread starts with SIGTERM/SIGINT blocked: they reach this (the engine's) thread
      sigset_t block, old;
      sigemptyset(&block);
      sigaddset(&block, SIGTERM);
      sigaddset(&block, SIGINT);
      pthread_sigmask(SIG_BLOCK, &block, &old);
      server.start();
      pthread_sigmask(SIG_SETMASK, &old, nullptr);
    }
    ATMOE_LOG("http")->info("listening on http://{}:{} (models: {}{}{}){}", o->host, server.port(),
                             sm.bundle_id.empty() ? "" : sm.bundle_id + ", ", sm.base_id,
                             sm.bundle ? fmt::format(", {} experts", sm.bundle->experts.size()) : "",
                             o->api_key.empty() ? "" : "; API key required");
    std::fprintf(stdout, "atmoe serve: listening on http://%s:%d (pid %d)\n", o->host.c_str(), server.port(),
                 int(::getpid()));
    std::fflush(stdout);

    // ---- The engine loop (this thread).
    std::vector<std::shared_ptr<Job>> live;
    auto settle = [&](Job& j, int status) {  // before the reply leaves: /metrics after it sees the request done
      j.done = true;
      --inbox.pending;
      metrics.count(j.endpoint, status);
    };
    // Logprobs of a streamed choice's tokens not yet sent (null when not asked).
    auto take_lp = [&](Job& j, int i) -> json {
      if (j.req.gen.logprobs < 0) return nullptr;
      auto& v = j.unsent_lp[size_t(i)];
      json lp = openai_logprobs(j.req, *model, v.data(), v.size(), j.text_offset[size_t(i)]);
      for (const auto& t : v) j.text_offset[size_t(i)] += int64_t(model->tokenizer().token_bytes(t.token).size());
      v.clear();
      return lp;
    };
    // One choice finished; the reply goes when every choice has.
    auto finish_choice = [&](const std::shared_ptr<Job>& jp, int i, const GenerateResult& g) {
      Job& j = *jp;
      j.results[size_t(i)] = g;
      if (j.req.stream && !j.client_gone && !j.failed)
        j.ex->stream(sse(openai_final_chunk(j.req, g, j.id, j.created, i, take_lp(j, i), *model, sm)));
      if (--j.left > 0) return;
      const double now = now_s();
      {  // counted before the reply leaves
        std::lock_guard<std::mutex> l(metrics.mu);
        metrics.prompt_tokens += uint64_t(g.prompt_tokens);
        for (const auto& r : j.results) metrics.completion_tokens += r.tokens.size();
        if (!j.client_gone) metrics.e2e.observe(now - j.t_arrive);
        const GenerateResult& g0 = j.results[0];
        if (g0.routing && g0.routing->adapter_slot < 0 && sm.bundle && sm.bundle->method == "at-moe" &&
            j.req.gen.use_experts)
          for (const auto& [name, w] : heaviest_groups(*sm.bundle, *g0.routing)) {
            auto& sw = metrics.group_weight[name];
            sw.first += w;
            ++sw.second;
          }
      }
      if (j.client_gone) {
        settle(j, 499);  // nginx's "client closed request"
      } else if (j.drain_cancelled && !j.req.stream) {
        settle(j, 503);
        int64_t toks = 0;
        for (const auto& r : j.results) toks += int64_t(r.tokens.size());
        j.ex->respond(503, "application/json",
                      error_body(503, fmt::format("the server shut down before this request finished ({} tokens "
                                                  "generated); retry",
                                                  toks)),
                      j.headers);
      } else if (j.req.stream) {
        settle(j, 200);
        if (j.req.include_usage) j.ex->stream(sse(openai_usage_chunk(j.req, j.results, j.id, j.created)));
        j.ex->stream("data: [DONE]\n\n");
        j.ex->end_stream();
      } else {
        settle(j, 200);
        json body = openai_response(j.req, j.results, j.id, j.created, *model, sm);
        j.ex->respond(200, "application/json", body.dump(-1, ' ', false, json::error_handler_t::replace), j.headers);
      }
    };
    double drain_deadline = 0, last_worker_stats = 0;
    int exit_signal = 0;
    for (;;) {
      std::deque<std::shared_ptr<Job>> fresh;
      std::deque<std::function<void()>> admin;
      bool look = false;
      {
        std::unique_lock<std::mutex> l(inbox.mu);
        if (sched.idle() && inbox.jobs.empty() && inbox.admin.empty() && !inbox.gone && !g_stop_signal && !draining)
          inbox.cv.wait_for(l, std::chrono::milliseconds(100));
        fresh.swap(inbox.jobs);
        admin.swap(inbox.admin);
        look = inbox.gone;
        inbox.gone = false;
      }
      for (auto& f : admin) f();  // adapters load and unload between steps (workers answer at once)
      if (pool) pool->collect_adapters();
      for (auto& jp : fresh) {
        Job& j = *jp;
        if (j.client_gone) {
          settle(j, 499);
          continue;
        }
        const int n = j.req.n;
        j.results.resize(size_t(n));
        j.unsent_lp.resize(size_t(n));
        j.text_offset.assign(size_t(n), 0);
        j.t_last.assign(size_t(n), 0);
        j.left = n;
        if (sched.waiting() + size_t(n) > so.max_queue) {
          const std::string msg = fmt::format("the queue is full ({} requests waiting)", sched.waiting());
          settle(j, 429);
          j.ex->respond(429, "application/json", error_body(429, msg), j.headers);
          continue;
        }
        try {
          if (j.req.stream) {
            j.ex->start_stream(200, "text/event-stream", j.headers);
            for (int i = 0; i < n; ++i) {
              const json first = openai_first_chunk(j.req, j.id, j.created, i);
              if (!first.is_null()) j.ex->stream(sse(first));
            }
          }
          submit_choices(sched, j.req, [&](int i) {
            RequestEvents ev;
            ev.on_token = [&metrics, jp, i](int32_t, const cpu::TokenLogprob* lp) {
              Job& x = *jp;
              if (lp && x.req.stream) x.unsent_lp[size_t(i)].push_back(*lp);
              const double now = now_s();
              std::lock_guard<std::mutex> l(metrics.mu);
              if (x.t_first == 0) {
                x.t_first = now;
                metrics.ttft.observe(now - x.t_arrive);
              } else if (x.t_last[size_t(i)] > 0) {
                metrics.itl.observe(now - x.t_last[size_t(i)]);
              }
              x.t_last[size_t(i)] = now;
            };
            if (j.req.stream)
              ev.on_text = [&take_lp, jp, i](const std::string& delta) {
                if (!delta.empty())
                  jp->ex->stream(sse(openai_text_chunk(jp->req, jp->id, jp->created, i, delta, take_lp(*jp, i))));
              };
            ev.on_finish = [&finish_choice, jp, i](const GenerateResult& g) { finish_choice(jp, i, g); };
            return ev;
          }, j.rids);
          if (!j.done) live.push_back(jp);
        } catch (const Error& e) {  // QueueFull (429) or a request the scheduler refuses (400)
          const int st = dynamic_cast<const QueueFull*>(&e) ? 429 : 400;
          j.failed = true;
          j.cancel(sched);  // choices already queued
          if (!j.done) {
            if (j.req.stream) {  // the headers are out: the error goes in the stream
              j.ex->stream(sse(json::parse(error_body(st, e.what()))));
              j.ex->stream("data: [DONE]\n\n");
              j.ex->end_stream();
            } else {
              j.ex->respond(st, "application/json", error_body(st, e.what()), j.headers);
            }
            settle(j, st);
          }
        }
      }
      if (look)
        for (auto& jp : live)
          if (jp->client_gone && !jp->cancel_sent) jp->cancel(sched);
      if (g_stop_signal && !draining) {
        exit_signal = g_stop_signal;
        draining = true;  // still accepting: /health answers 503 to probes, new requests 503
        drain_deadline = now_s() + o->drain_timeout;
        ATMOE_LOG("http")->info("{}: draining {} requests (at most {} s), refusing new ones",
                                 exit_signal == SIGINT ? "SIGINT" : "SIGTERM", live.size(), o->drain_timeout);
      }
      if (draining && (now_s() >= drain_deadline || g_stop_count > 1))  // a second signal: at once
        for (auto& jp : live)
          if (!jp->cancel_sent) {
            jp->drain_cancelled = true;
            jp->cancel(sched);
          }
      if (sched.idle()) {
        live.clear();
        if (draining) {
          std::lock_guard<std::mutex> l(inbox.mu);
          if (inbox.jobs.empty() && inbox.admin.empty()) break;
        }
        continue;
      }
      const double t0 = now_s();
      sched.step();
      const double t1 = now_s();
      live.erase(std::remove_if(live.begin(), live.end(), [](auto& j) { return j->done; }), live.end());
      std::vector<json> ws;
      if (remote && t1 - last_worker_stats > 5) {
        ws = remote->worker_stats();
        last_worker_stats = t1;
      }
      std::lock_guard<std::mutex> l(metrics.mu);
      metrics.waiting = sched.waiting();
      metrics.running = sched.running();
      metrics.kv_reserved = sched.kv_reserved_bytes();
      metrics.step_tokens = sched.last_step_tokens();
      ++metrics.steps;
      metrics.step_seconds += t1 - t0;
      if (!ws.empty()) metrics.workers = std::move(ws);
    }
    // Give the last replies a moment to leave, then close every connection.
    for (int i = 0; i < 50 && server.connections() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    server.stop();
    sigaction(SIGTERM, &old_term, nullptr);
    sigaction(SIGINT, &old_int, nullptr);
    ATMOE_LOG("http")->info("stopped ({})", exit_signal == SIGINT ? "SIGINT" : "SIGTERM");
    return 0;
  };
}

}  // namespace atmoe::app
