// atmoe batch: OpenAI Batch API JSONL in (the format vLLM's run-batch reads), one output
// line per request, resumable (docs/batch.md).
//
// Every input line is checked before the run starts; a bad line becomes an error line and
// the job goes on. Output lines are written whole (one write(2) each) as requests finish;
// a rerun with the same --output keeps the successful lines, skips their ids, runs the
// rest again (error lines included: a fixed flag or budget retries them), and cuts a torn
// last line (kill -9, a full disk) first. The output is locked (flock) while a job runs. SIGTERM/SIGINT (scancel, Slurm
// preemption, Ctrl-C) abandon the requests in flight, keep every finished line and exit
// 128 + signal: a rerun resumes. --shard K/N takes every N-th line (Slurm array jobs).
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <random>
#include <unordered_map>
#include <unordered_set>

#include "apps/commands.h"
#include "apps/launch.h"
#include "apps/openai_api.h"
#include "common/clock.h"
#include "common/comm_mpi.h"
#include "common/error.h"
#include "common/files.h"
#include "common/log.h"
#include "coordinator/scheduler.h"

namespace atmoe::app {

using json = nlohmann::json;

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;
void on_stop(int sig) { g_stop_signal = sig; }

constexpr size_t kMaxLineBytes = size_t(64) << 20;

struct Line {
  size_t number = 0;  // 1-based line of the input file
  std::string custom_id;
  bool has_id = false;
  std::string error;  // non-empty: a bad line
  std::string error_code = "invalid_request";
  json body;
  Endpoint endpoint = Endpoint::Completions;
  OpenAiRequest req;
};

// "K/N" -> (K, N), 0 <= K < N.
std::pair<int, int> parse_shard(const std::string& s) {
  const size_t slash = s.find('/');
  int k = -1, n = 0;
  auto digits = [](const std::string& t) {
    return !t.empty() && t.size() <= 9 && t.find_first_not_of("0123456789") == std::string::npos;
  };
  try {
    if (slash != std::string::npos && digits(s.substr(0, slash)) && digits(s.substr(slash + 1))) {
      size_t a = 0, b = 0;
      k = std::stoi(s.substr(0, slash), &a);
      n = std::stoi(s.substr(slash + 1), &b);
      if (a != slash || b != s.size() - slash - 1) n = 0;
    }
  } catch (const std::exception&) {
    n = 0;
  }
  ATMOE_CHECK_INPUT(n >= 1 && k >= 0 && k < n, "--shard \"{}\": must be K/N with 0 <= K < N (K as SLURM_ARRAY_TASK_ID)",
                    s);
  return {k, n};
}

// Every line atmoe writes starts so (nlohmann's keys are sorted).
bool ours(const std::string& line) { return line.rfind("{\"atmoe\":", 0) == 0 || line.rfind("{\"custom_id\":", 0) == 0; }
// A torn last line: any prefix of such a line (a write cut short can leave a few bytes).
bool ours_torn(const std::string& tail) {
  static const std::string a = "{\"atmoe\":", c = "{\"custom_id\":";
  auto prefix_of = [&](const std::string& p) { return tail.size() <= p.size() && p.compare(0, tail.size(), tail) == 0; };
  return ours(tail) || prefix_of(a) || prefix_of(c);
}

// The output so far. Whole lines are checked first (a file that is not a batch output is
// refused untouched); then a torn last line is cut, and error lines are dropped (their
// requests run again): the file is rewritten with the successful lines only, through a
// temporary file and a rename. Returns the custom_ids of those lines.
std::unordered_set<std::string> resume_output(const std::string& path, const std::unordered_map<std::string, size_t>& ids,
                                              size_t& lines_kept, bool& rewritten) {
  std::unordered_set<std::string> done;
  lines_kept = 0;
  rewritten = false;
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return done;
  require_regular_file(path, "--output");
  const std::string data = read_file(path, "--output", size_t(1) << 40);
  const size_t end = data.rfind('\n');
  const size_t keep = end == std::string::npos ? 0 : end + 1;
  std::string kept;
  size_t pos = 0, no = 0, dropped = 0;
  while (pos < keep) {
    const size_t nl = data.find('\n', pos);
    const std::string line = data.substr(pos, nl - pos);
    pos = nl + 1;
    ++no;
    json j = json::parse(line, nullptr, false);
    ATMOE_CHECK_INPUT(ours(line) && !j.is_discarded() && j.is_object() && j.contains("custom_id"),
                      "--output {} line {}: not a batch output line: refusing to resume into it (another file?)", path,
                      no);
    const bool ok = j.contains("response") && j["response"].is_object() && j["response"].value("status_code", 0) == 200;
    if (ok && j["custom_id"].is_string())
      ATMOE_CHECK_INPUT(ids.count(j["custom_id"].get<std::string>()),
                        "--output {} line {}: custom_id \"{}\" is not in --input: another job's output? (refusing to "
                        "resume into it)",
                        path, no, j["custom_id"].get<std::string>());
    if (ok && j["custom_id"].is_string() && !done.count(j["custom_id"].get<std::string>())) {
      done.insert(j["custom_id"].get<std::string>());
      kept += line;
      kept += '\n';
      ++lines_kept;
    } else {
      ++dropped;
    }
  }
  const bool torn = keep < data.size();
  if (torn) {
    ATMOE_CHECK_INPUT(ours_torn(data.substr(keep)),
                      "--output {}: its last {} bytes are not a batch output line: refusing to resume into it "
                      "(another file?)",
                      path, data.size() - keep);
    ATMOE_LOG("batch")->warn("--output {}: cut a torn last line of {} bytes (an interrupted write); its request runs again",
                             path, data.size() - keep);
  }
  if (torn || dropped) {
    if (dropped) ATMOE_LOG("batch")->info("--output {}: {} error lines dropped: their requests run again", path, dropped);
    const std::string tmp = path + ".resume.tmp";
    write_file(tmp, kept, "--output (rewritten for the resume)");
    std::filesystem::rename(tmp, path);
    rewritten = true;
  }
  return done;
}

// The output file, opened for appending and locked (flock) for the whole job.
class Output {
 public:
  explicit Output(const std::string& path) : path_(path) {
    std::error_code ec;
    if (std::filesystem::exists(path_, ec)) require_regular_file(path_, "--output");  // not a FIFO: no blocking open
    fd_ = open_locked();
  }
  ~Output() {
    if (fd_ >= 0) ::close(fd_);
  }
  // After the file was replaced (resume): the new one, locked before the old lock goes.
  void reopen() {
    const int fd = open_locked();
    ::close(fd_);
    fd_ = fd;
  }
  // One whole line per call: a single write(2) when it can, retried on a short write.
  void write_line(const json& j) {
    std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
    s += '\n';
    size_t off = 0;
    while (off < s.size()) {
      const ssize_t n = ::write(fd_, s.data() + off, s.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        throw RuntimeError(fmt::format("--output {}: write failed: {} (rerun to resume)", path_, std::strerror(errno)));
      off += size_t(n);
    }
  }

 private:
  int open_locked() const {
    const int fd = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) throw InputError(fmt::format("--output {}: cannot open for writing: {}", path_, std::strerror(errno)));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd);
      throw InputError(fmt::format("--output {}: another job is writing it (locked): one job per output file", path_));
    }
    // The file locked must still be the one at the path: a job resuming meanwhile may have
    // renamed a rewritten file over it (then that job holds the new one's lock).
    struct stat a {}, b {};
    if (::fstat(fd, &a) != 0 || ::stat(path_.c_str(), &b) != 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
      ::close(fd);
      throw InputError(fmt::format("--output {}: another job is writing it (replaced while locking): one job per "
                                   "output file",
                                   path_));
    }
    return fd;
  }
  std::string path_;
  int fd_ = -1;
};

// A failed request: response carries the HTTP status and OpenAI's error body (as the
// server would answer), error the same code and message.
json error_line(const Line& l, const std::string& code, const std::string& msg) {
  const int status = code == "model_not_found" ? 404 : 400;
  const std::string rid = fmt::format("line-{}", l.number);
  json j = {{"id", "atmoe-batch-" + rid},
            {"custom_id", l.has_id ? json(l.custom_id) : json(nullptr)},
            {"response",
             {{"status_code", status},
              {"request_id", rid},
              {"body", {{"error", {{"message", msg}, {"type", "invalid_request_error"}, {"param", nullptr}, {"code", code}}}}}}},
            {"error", {{"code", code}, {"message", msg}}}};
  j["atmoe"] = {{"line", l.number}};
  return j;
}

std::string eta(double s) {
  if (!(s >= 0) || s > 1e7) return "?";
  const long t = long(s);
  return t >= 3600 ? fmt::format("{}h{:02}m", t / 3600, t / 60 % 60) : fmt::format("{}m{:02}s", t / 60, t % 60);
}

}  // namespace

Runner add_batch(CLI::App& app) {
  struct Opts {
    std::string model, bundle, input, output, shard, dtype, placement, seed;
    bool trace = false, check_tensors = false;
    SchedulerFlags sf;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--bundle", o->bundle, "Expert bundle directory (atmoe.json)");
  app.add_option("--model", o->model, "Model: a .gguf file or an HF directory (overrides a bundle's base_model)");
  app.add_option("--input", o->input, "OpenAI Batch API JSONL: custom_id, method, url, body per line")->required();
  app.add_option("--output", o->output, "Output JSONL (appended to: a rerun resumes)")->required();
  app.add_option("--shard", o->shard, "K/N: only every N-th input line, from line K (0-based; SLURM_ARRAY_TASK_ID)");
  app.add_flag("--trace", o->trace, "Write each request's full routing trace into its output line");
  add_scheduler_flags(app, o->sf);
  app.add_option("--seed", o->seed, "Seed of requests that give none (default: each line's number)");
  app.add_option("--dtype", o->dtype, "Weight/compute precision: bf16 (default) or f32 (exact)");
  add_placement_flag(app, o->placement);
  app.add_flag("--check-tensors", o->check_tensors, "Check every base-model weight for NaN/Inf at load");
  return [o]() -> int {
    ATMOE_CHECK_INPUT(!o->model.empty() || !o->bundle.empty(), "batch: give --bundle DIR or --model PATH");
    ATMOE_CHECK_INPUT(!o->bundle.empty() || o->placement.empty(), "--placement needs --bundle");
    SchedulerOptions so = scheduler_options(o->sf);
    so.max_queue = size_t(2 * o->sf.max_running) + size_t(kMaxChoices);  // fed as it drains (below)
    const auto [shard_k, shard_n] = o->shard.empty() ? std::pair<int, int>{0, 1} : parse_shard(o->shard);
    const uint64_t seed_base = o->seed.empty() ? 0 : parse_u64_flag("--seed", o->seed);
    // Graceful stop on SIGTERM/SIGINT, from here on (a signal during reading, loading or
    // checking ends the job before its run, with the same summary). Under mpirun with workers rank 0 keeps the
    // launcher's handling (it names a dead worker and ends the job at once); every line
    // written stays whole either way.
    MpiSession* mpi = MpiSession::get();
    const bool graceful = !mpi || mpi->size() == 1;
    struct sigaction sa {}, old_term {}, old_int {};
    if (graceful) {
      sa.sa_handler = on_stop;
      sigemptyset(&sa.sa_mask);
      sigaction(SIGTERM, &sa, &old_term);
      sigaction(SIGINT, &sa, &old_int);
    }
    {
      std::error_code ec;
      ATMOE_CHECK_INPUT(!std::filesystem::exists(o->output, ec) ||
                            !std::filesystem::equivalent(o->input, o->output, ec),
                        "--output {}: is the input file", o->output);
      // A symlinked output: the resume's rewrite goes to the file it points to.
      if (std::filesystem::is_symlink(o->output, ec)) o->output = std::filesystem::weakly_canonical(o->output, ec).string();
    }
    ATMOE_CHECK_INPUT(!o->trace || !o->bundle.empty(), "--trace needs --bundle");
    // 1. The input, structurally (before any weights load). custom_ids are read from every
    // line, in this shard or not, so a duplicate is found whatever the sharding.
    require_regular_file(o->input, "--input");
    std::ifstream in(o->input, std::ios::binary);
    ATMOE_CHECK_INPUT(in.good(), "--input {}: cannot open for reading", o->input);
    std::vector<Line> lines;
    std::unordered_map<std::string, size_t> first_line;
    std::string text;
    size_t no = 0;
    while (std::getline(in, text)) {
      ++no;
      const bool mine = (no - 1) % size_t(shard_n) == size_t(shard_k);  // lines from 0, as documented
      if (!text.empty() && text.back() == '\r') text.pop_back();
      if (text.find_first_not_of(" \t") == std::string::npos) continue;  // blank lines
      Line l;
      l.number = no;
      json j = text.size() <= kMaxLineBytes ? json::parse(text, nullptr, false) : json(json::value_t::discarded);
      const bool has_id = !j.is_discarded() && j.is_object() && j.contains("custom_id") && j["custom_id"].is_string() &&
                          !j["custom_id"].get<std::string>().empty();
      bool dup = false;
      size_t first = 0;
      if (has_id) {
        auto [it, fresh] = first_line.emplace(j["custom_id"].get<std::string>(), no);
        dup = !fresh;
        first = it->second;
      }
      if (!mine) continue;
      if (text.size() > kMaxLineBytes) {
        l.error = fmt::format("{} bytes, over the {} MiB a line may hold", text.size(), kMaxLineBytes >> 20);
      } else if (text.find('\0') != std::string::npos) {
        l.error = "a NUL byte in the line (JSON text has none)";
      } else if (j.is_discarded() || !j.is_object()) {
        l.error = "not a JSON object (one request per line: {\"custom_id\", \"method\", \"url\", \"body\"})";
      } else if (!has_id) {
        l.error = "custom_id: missing or not a non-empty string";
      } else if (dup) {
        // Its error line must not stand for the first one's result: no custom_id on it.
        l.error = fmt::format("custom_id \"{}\": duplicate of line {}", j["custom_id"].get<std::string>(), first);
      } else {
        l.custom_id = j["custom_id"].get<std::string>();
        l.has_id = true;
        if (!j.contains("method") || j["method"] != "POST") {
          l.error = "method: must be \"POST\"";
        } else if (!j.contains("url") || !j["url"].is_string()) {
          l.error = "url: missing (/v1/chat/completions or /v1/completions)";
        } else if (!j.contains("body") || !j["body"].is_object()) {
          l.error = "body: missing or not an object";
        } else {
          try {
            l.endpoint = parse_endpoint(j["url"].get<std::string>());
            l.body = std::move(j["body"]);
          } catch (const InputError& e) {
            l.error = e.what();
          }
        }
      }
      lines.push_back(std::move(l));
    }
    ATMOE_CHECK_INPUT(!in.bad(), "--input {}: read error", o->input);
    // Flags that fail before the output is touched: the dtype, the bundle's manifest.
    const DType dtype = parse_dtype_flag(o->dtype);
    std::unique_ptr<Bundle> bundle;
    if (!o->bundle.empty()) bundle = std::make_unique<Bundle>(load_bundle_manifest(o->bundle));
    // 2. The output so far (resume), and the output file checked writable before loading.
    Output out(o->output);  // locked first: no other job rewrites it meanwhile
    size_t kept = 0;
    bool rewritten = false;
    const std::unordered_set<std::string> done = resume_output(o->output, first_line, kept, rewritten);
    if (rewritten) out.reopen();
    if (kept) ATMOE_LOG("batch")->info("--output {}: {} lines already written: resuming", o->output, kept);
    // 3. The model, then every request's body (and its KV cache against the budget).
    auto model = Model::load(o->model.empty() ? bundle->base_model : o->model, dtype, o->check_tensors);
    BundleExperts bx;
    if (bundle) bx = attach_experts(*bundle, *model, o->placement);
    const ServedModels sm = served_models(*model, bundle.get());
    Scheduler sched(*model, so);
    size_t n_bad = 0, n_skip = 0, n_todo = 0, n_bad_written = 0;
    std::vector<Line*> todo;
    for (Line& l : lines) {
      if (l.has_id && done.count(l.custom_id)) {
        ++n_skip;
        l.body = json();
        continue;
      }
      if (l.error.empty()) {
        try {
          l.req = parse_openai_request(l.body, l.endpoint, *model, sm, seed_base + l.number);
          if (l.req.stream) throw InputError("body.stream: must be false in a batch (one output line per request)");
          if (o->trace) {
            l.req.routing_trace = true;
            l.req.gen.trace_tokens = true;
          }
          check_kv_budget(sched, l.req.gen, o->sf.kv_budget_mib);
        } catch (const NotFoundError& e) {
          l.error = e.what();
          l.error_code = "model_not_found";
        } catch (const InputError& e) {
          l.error = e.what();
        }
        l.body = json();
      }
      if (!l.error.empty()) {
        ++n_bad;
        if (n_bad <= 20) ATMOE_LOG("batch")->warn("--input {} line {}: {}", o->input, l.number, one_line(l.error));
        out.write_line(error_line(l, l.error_code, fmt::format("line {}: {}", l.number, l.error)));
        ++n_bad_written;
        continue;
      }
      todo.push_back(&l);
      ++n_todo;
    }
    if (n_bad > 20) ATMOE_LOG("batch")->warn("--input {}: {} bad lines in all (the first 20 above)", o->input, n_bad);
    std::fprintf(stderr, "atmoe batch: %zu requests%s: %zu already done in %s, %zu bad (error lines), %zu to run\n",
                 lines.size(), shard_n > 1 ? fmt::format(" (shard {}/{})", shard_k, shard_n).c_str() : "", n_skip,
                 o->output.c_str(), n_bad, n_todo);

    // 4. Run: the scheduler's queue is fed as it drains; each finished request is one line.
    std::mt19937_64 idrng(std::random_device{}());
    const int64_t created = int64_t(std::time(nullptr));
    size_t next = 0, n_ok = 0, n_fail = 0;
    int64_t toks_in = 0, toks_out = 0;
    const bool tty = ::isatty(2);
    const double t0 = now_s();
    double last_report = t0;
    auto report = [&](bool final) {
      const double t = now_s() - t0;
      const size_t finished = n_ok + n_fail;
      const double rate = t > 0 ? double(toks_out) / t : 0;
      const double per_req = finished ? t / double(finished) : 0;
      const std::string msg =
          fmt::format("atmoe batch: {}/{} done, {:.1f} tok/s, {} running, ETA {}", finished, n_todo, rate,
                      sched.running(), finished ? eta(per_req * double(n_todo - finished)) : "?");
      if (tty) std::fprintf(stderr, "\r%s\x1b[K%s", msg.c_str(), final ? "\n" : "");
      else std::fprintf(stderr, "%s\n", msg.c_str());
    };
    while (g_stop_signal == 0) {
      while (next < todo.size() && sched.waiting() + size_t(kMaxChoices) <= so.max_queue) {
        Line* l = todo[next++];
        // One scheduler request per choice (n); the line is written when all are done.
        auto results = std::make_shared<std::vector<GenerateResult>>(size_t(l->req.n));
        auto left = std::make_shared<int>(l->req.n);
        std::vector<RequestId> ids;
        try {
          submit_choices(sched, l->req, [&, l, results, left](int i) {
            RequestEvents ev;
            ev.on_finish = [&, l, i, results, left](const GenerateResult& g) {
              (*results)[size_t(i)] = g;
              if (--*left > 0) return;
              const std::string rid = fmt::format("{:016x}", idrng());
              json body = openai_response(
                  l->req, *results, (l->endpoint == Endpoint::ChatCompletions ? "chatcmpl-" : "cmpl-") + rid, created,
                  *model, sm);
              out.write_line({{"id", "atmoe-batch-" + rid},
                              {"custom_id", l->custom_id},
                              {"response", {{"status_code", 200}, {"request_id", rid}, {"body", std::move(body)}}},
                              {"error", nullptr}});
              ++n_ok;
              toks_in += results->front().prompt_tokens;
              for (const auto& r : *results) toks_out += int64_t(r.tokens.size());
            };
            return ev;
          }, ids);
        } catch (const InputError& e) {  // e.g. over the KV budget: this request alone (its first choice)
          for (RequestId id : ids) sched.cancel(id);  // choices already queued (their line is never written)
          out.write_line(error_line(*l, "invalid_request", fmt::format("line {}: {}", l->number, e.what())));
          ++n_fail;
        }
      }
      if (!sched.step()) break;
      const double now = now_s();
      if (now - last_report >= (tty ? 0.5 : 10.0)) {
        report(false);
        last_report = now;
      }
    }
    if (graceful) {
      sigaction(SIGTERM, &old_term, nullptr);
      sigaction(SIGINT, &old_int, nullptr);
    }
    if (tty || n_ok + n_fail > 0) report(true);
    const double t = now_s() - t0;
    if (g_stop_signal != 0) {
      const int sig = g_stop_signal;
      std::fprintf(stderr,
                   "atmoe batch: stopped by %s: %zu of %zu requests written this run, %zu running or queued "
                   "abandoned (not written); rerun the same command to resume\n",
                   sig == SIGINT ? "SIGINT" : "SIGTERM", n_ok + n_fail, n_todo, sched.running() + sched.waiting());
      return 128 + sig;
    }
    std::fprintf(stderr,
                 "atmoe batch: %zu requests in %.1f s: %zu ok, %zu error lines written (%zu bad input lines), %zu "
                 "skipped (already in the output); %lld prompt + %lld completion tokens (%.1f tok/s)\n",
                 lines.size(), t, n_ok, n_fail + n_bad_written, n_bad_written, n_skip, (long long)toks_in,
                 (long long)toks_out, t > 0 ? double(toks_out) / t : 0.0);
    return 0;
  };
}

}  // namespace atmoe::app
