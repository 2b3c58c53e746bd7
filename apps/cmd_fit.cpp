// `atmoe fit-router` (AT-MoE stage 2: the per-layer grouped router fitted with the experts
// frozen, DESIGN.md 1.4) and `atmoe fit-intuition` (T-REX's k-means++ centroids).
// docs/fitting.md describes the data, the method and the report.
#include <algorithm>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <iostream>
#include <random>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "apps/commands.h"
#include "apps/openai_api.h"
#include "common/bundle.h"
#include "common/clock.h"
#include "common/error.h"
#include "common/files.h"
#include "common/log.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "common/trex_adapter.h"
#include "common/wire.h"
#include "coordinator/experts.h"
#include "coordinator/fit_report_svg.h"
#include "coordinator/kv_cache.h"
#include "coordinator/model.h"
#include "coordinator/router_fit.h"
#include "coordinator/trex_pool.h"
#include "kernels/cpu/sampling.h"
#include "worker/expert_shard.h"

namespace atmoe::app {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// One labelled line of the data file.
struct FitLine {
  int line = 0;                      // 1-based line number in the file
  std::vector<int32_t> prompt;
  std::vector<double> group_t;       // [G] target distribution over groups
  std::vector<double> expert_t;      // [E] target over experts (empty: groups only)
  std::vector<int32_t> completion;   // for choosing lambda (empty: none)
  std::vector<float> embedding;      // fit-intuition: a given embedding instead of a prompt
  std::string task;
};

struct DataFile {
  std::string path, sha256;
  size_t bytes = 0;
  std::vector<FitLine> lines;
};

[[noreturn]] void line_error(const std::string& path, int line, const std::string& what) {
  throw InputError(fmt::format("{}:{}: {}", path, line, what));
}

// The prompt of a line: "prompt" (raw text, as /v1/completions) or "messages" (the chat
// template, as /v1/chat/completions); exactly one.
std::vector<int32_t> line_prompt(const Model& m, const json& j, const std::string& path, int ln) {
  const bool p = j.contains("prompt"), ms = j.contains("messages");
  if (p == ms) line_error(path, ln, "give exactly one of \"prompt\" (text) and \"messages\" (chat)");
  std::vector<int32_t> t;
  try {
    if (p) {
      if (!j["prompt"].is_string() || j["prompt"].get<std::string>().empty())
        line_error(path, ln, "prompt: expected a non-empty string");
      const std::string& s = j["prompt"].get_ref<const std::string&>();
      ATMOE_CHECK_INPUT(s.size() <= prompt_bytes_cap(m), "prompt: {} bytes can never fit the context of {} tokens",
                        s.size(), m.config().max_position);
      t = m.tokenizer().encode(s, m.tokenizer().add_bos_default(), false);
    } else {
      t = chat_tokens(m, parse_messages(j["messages"]));
    }
  } catch (const InputError& e) {
    std::string w = e.what();
    if (w.rfind("body.", 0) == 0) w = w.substr(5);
    if (w.rfind(path + ":", 0) == 0) throw;
    line_error(path, ln, w);
  }
  if (t.empty()) line_error(path, ln, "the prompt is empty after tokenization");
  if (int64_t(t.size()) > m.config().max_position)
    line_error(path, ln, fmt::format("the prompt has {} tokens; the context holds {}", t.size(), m.config().max_position));
  return t;
}

// {"name": weight, ...} over `names` (index by name), weights >= 0 summing to > 0, normalised.
std::vector<double> line_target(const json& v, const std::string& field, size_t n,
                                const std::function<int(const std::string&)>& index, const std::string& what,
                                const std::string& path, int ln) {
  if (!v.is_object() || v.empty())
    line_error(path, ln, fmt::format("{}: expected an object {{\"name\": weight, ...}} ({})", field, what));
  std::vector<double> t(n, 0.0);
  double s = 0;
  for (auto it = v.begin(); it != v.end(); ++it) {
    const int k = index(it.key());
    if (k < 0) line_error(path, ln, fmt::format("{}: '{}' is not {} of this bundle", field, it.key(), what));
    if (!it.value().is_number() || !std::isfinite(it.value().get<double>()) || it.value().get<double>() < 0)
      line_error(path, ln, fmt::format("{}.{}: expected a finite weight >= 0", field, it.key()));
    t[size_t(k)] = it.value().get<double>();
  }
  // Scaled by the largest first, so that the sum stays finite (1e308 twice would overflow).
  const double tmax = *std::max_element(t.begin(), t.end());
  if (tmax > 0)
    for (auto& x : t) s += (x /= tmax);
  if (!(s > 0)) line_error(path, ln, fmt::format("{}: the weights must sum to a positive value", field));
  for (auto& x : t) x /= s;
  return t;
}

// Reads the JSONL data. router: lines need a target (groups or experts); else (fit-intuition)
// lines are a prompt, messages or an embedding of `emb_dim` values.
DataFile read_data(const std::string& path, const Model& m, const Bundle* b, int64_t emb_dim) {
  DataFile df;
  df.path = path;
  const std::string all = read_file(path, "--data", size_t(1) << 30);
  df.bytes = all.size();
  df.sha256 = sha256_hex(all.data(), all.size());
  size_t pos = 0;
  int ln = 0;
  while (pos < all.size()) {
    size_t end = all.find('\n', pos);
    if (end == std::string::npos) end = all.size();
    ++ln;
    std::string_view text(all.data() + pos, end - pos);
    pos = end + 1;
    if (text.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    json j;
    try {
      j = json::parse(text);
    } catch (const json::exception& e) {
      line_error(path, ln, fmt::format("not valid JSON ({})", one_line(e.what())));
    }
    if (!j.is_object()) line_error(path, ln, "expected a JSON object");
    static const std::set<std::string> router_keys = {"prompt", "messages", "groups", "experts", "completion", "task", "id"};
    static const std::set<std::string> intuition_keys = {"prompt", "messages", "embedding", "task", "id",
                                                         "groups", "experts", "completion"};
    for (auto it = j.begin(); it != j.end(); ++it)
      if (!(b ? router_keys : intuition_keys).count(it.key()))
        line_error(path, ln,
                   fmt::format("unknown field '{}' (expected {})", it.key(),
                               b ? "prompt or messages, groups or experts, completion, task, id"
                                 : "prompt, messages or embedding, task, id"));
    FitLine l;
    l.line = ln;
    if (j.contains("task")) {
      if (!j["task"].is_string()) line_error(path, ln, "task: expected a string");
      l.task = j["task"].get<std::string>();
    }
    if (!b && j.contains("embedding")) {
      if (j.contains("prompt") || j.contains("messages"))
        line_error(path, ln, "give one of prompt, messages and embedding");
      const json& e = j["embedding"];
      if (!e.is_array() || int64_t(e.size()) != emb_dim)
        line_error(path, ln, fmt::format("embedding: expected an array of {} numbers", emb_dim));
      double nrm = 0;
      for (size_t i = 0; i < e.size(); ++i) {
        if (!e[i].is_number() || !std::isfinite(e[i].get<double>()) || std::fabs(e[i].get<double>()) > 3.4e38)
          line_error(path, ln, fmt::format("embedding[{}]: expected a finite number", i));
        l.embedding.push_back(e[i].get<float>());
        nrm += double(l.embedding.back()) * l.embedding.back();
      }
      if (!(nrm > 0)) line_error(path, ln, "embedding: must not be all zeros");
    } else {
      l.prompt = line_prompt(m, j, path, ln);
    }
    if (b) {
      const bool g = j.contains("groups"), e = j.contains("experts");
      if (g == e) line_error(path, ln, "give exactly one target: \"groups\" {name: weight} or \"experts\" {name: weight}");
      const size_t G = b->groups.size(), E = b->experts.size();
      if (g) {
        l.group_t = line_target(j["groups"], "groups", G, [&](const std::string& n) { return b->group_index(n); }, "a group", path, ln);
      } else {
        l.expert_t = line_target(j["experts"], "experts", E, [&](const std::string& n) { return b->expert_index(n); }, "an expert", path, ln);
        l.group_t.assign(G, 0.0);
        for (size_t k = 0; k < E; ++k) l.group_t[size_t(b->experts[k].group)] += l.expert_t[k];
      }
      if (j.contains("completion")) {
        if (!j["completion"].is_string()) line_error(path, ln, "completion: expected a string");
      }
      if (j.contains("completion") && b->general) {  // only used to choose lambda
        l.completion = m.tokenizer().encode(j["completion"].get<std::string>(), false, false);
        if (m.tokenizer().eos_id() >= 0) l.completion.push_back(m.tokenizer().eos_id());
        if (int64_t(l.prompt.size() + l.completion.size()) > m.config().max_position)
          line_error(path, ln, "prompt and completion do not fit the context");
      }
    }
    df.lines.push_back(std::move(l));
  }
  ATMOE_CHECK_INPUT(!df.lines.empty(), "{}: no data lines", path);
  return df;
}

// A deterministic permutation (Fisher-Yates on mt19937_64's raw output: the same on every
// standard library, unlike std::shuffle).
std::vector<size_t> permutation(size_t n, uint64_t seed) {
  std::vector<size_t> p(n);
  for (size_t i = 0; i < n; ++i) p[i] = i;
  std::mt19937_64 rng(seed);
  for (size_t i = n; i > 1; --i) std::swap(p[i - 1], p[size_t(rng() % i)]);
  return p;
}

// The routing a line's target gives, set by index (a group and an expert may share a name):
// groups pinned to their target weights and, inside each, the line's expert targets or
// (groups-only lines) a uniform mix: what a fitted router with W_D = 0 produces there.
void pin_target(const Bundle& b, const FitLine& l, ResolvedRouting& ctl) {
  const size_t G = b.groups.size(), E = b.experts.size();
  ctl.pin = l.group_t;
  ctl.pin_expert.assign(E, 0.0);
  for (size_t g = 0; g < G; ++g) {
    if (!(l.group_t[g] > 0)) continue;
    const auto& ex = b.groups[g].experts;
    for (int e : ex)
      ctl.pin_expert[size_t(e)] = l.expert_t.empty() ? 1.0 / double(ex.size()) : l.expert_t[size_t(e)] / l.group_t[g];
  }
}

// Runs the prompts of lines[idx] (batches of about `batch_tokens`, each prompt whole) with
// the routing `route(line)` makes, and hands each finished sequence's routing state to
// `done(line, state)`.
void run_prompts(Model& m, ExpertPool& pool, const std::vector<FitLine>& lines, const std::vector<size_t>& idx,
                 int64_t batch_tokens, const std::function<std::unique_ptr<SeqRouting>(const FitLine&)>& route,
                 const std::function<void(size_t, const SeqRouting&)>& done, const char* what) {
  std::vector<float> logits;
  size_t i = 0;
  int64_t done_tokens = 0, total_tokens = 0;
  for (size_t k : idx) total_tokens += int64_t(lines[k].prompt.size());
  double t_log = now_s();
  while (i < idx.size()) {
    std::vector<std::unique_ptr<KvCache>> caches;
    std::vector<std::unique_ptr<SeqRouting>> routes;
    std::vector<ForwardItem> items;
    std::vector<size_t> batch;
    int64_t tok = 0;
    while (i < idx.size() && (items.empty() || tok + int64_t(lines[idx[i]].prompt.size()) <= batch_tokens)) {
      const FitLine& l = lines[idx[i]];
      caches.push_back(m.new_cache());
      routes.push_back(route(l));
      items.push_back({caches.back().get(), l.prompt.data(), int64_t(l.prompt.size()), LogitsMode::None, routes.back().get()});
      batch.push_back(idx[i]);
      tok += int64_t(l.prompt.size());
      ++i;
    }
    m.forward(items, logits);
    pool.end_step();
    for (size_t k = 0; k < items.size(); ++k) done(batch[k], *routes[k]);
    done_tokens += tok;
    if (now_s() - t_log > 10 || i == idx.size()) {
      ATMOE_LOG("fit")->info("{}: {}/{} prompts, {}/{} tokens", what, i, idx.size(), done_tokens, total_tokens);
      t_log = now_s();
    }
  }
}

// Router inputs of the training lines, taken with each line's target pinned: per layer,
// rows of `hidden` floats; row_line[r] is the line of row r. per_token keeps at most
// `per_prompt` evenly spaced tokens of each prompt.
struct Features {
  std::vector<std::vector<float>> x;  // [L][rows * d]
  std::vector<size_t> row_line;
  int64_t rows = 0;
};

Features gather_features(Model& m, ExpertPool& pool, const std::vector<FitLine>& lines, const std::vector<size_t>& idx,
                         int per_prompt, int64_t batch_tokens, bool base, std::optional<double> lambda) {
  const int L = m.config().n_layers;
  const int64_t d = m.config().hidden;
  Features f;
  f.x.assign(size_t(L), {});
  run_prompts(
      m, pool, lines, idx, batch_tokens,
      [&](const FitLine& l) {
        auto r = pool.new_routing(RoutingControls{});
        pin_target(pool.bundle(), l, r->ctl);
        if (lambda) r->ctl.lambda = *lambda;  // the general expert's blend the router will run with
        if (base) {
          // --features base: the experts add nothing (lambda 0; the adapter index keeps the
          // general expert's 1 - lambda off too), while the router still sees every layer.
          r->ctl.lambda = 0;
          r->ctl.adapter = 0;
        }
        r->keep_inputs = true;
        return r;
      },
      [&](size_t line, const SeqRouting& r) {
        const auto& in = r.inputs;
        ATMOE_ASSERT(int(in.size()) == L);
        const int64_t n = int64_t(in[0].size()) / d;
        std::vector<int64_t> keep;
        for (int64_t j = 0; j < std::min<int64_t>(n, per_prompt); ++j) keep.push_back(n <= per_prompt ? j : j * n / per_prompt);
        for (int l = 0; l < L; ++l)
          for (int64_t j : keep)
            f.x[size_t(l)].insert(f.x[size_t(l)].end(), in[size_t(l)].begin() + j * d, in[size_t(l)].begin() + (j + 1) * d);
        f.row_line.insert(f.row_line.end(), keep.size(), line);
        f.rows += int64_t(keep.size());
      },
      "features");
  return f;
}

double clamp_log(double p) { return std::log(std::max(p, 1e-300)); }

// Heaviest entries of a target: the set of indices within 1e-9 of its maximum.
bool argmax_in_target(const double* pred, const double* target, int n) {
  int best = 0;
  double tmax = 0;
  for (int k = 0; k < n; ++k) {
    if (pred[k] > pred[best]) best = k;
    tmax = std::max(tmax, target[k]);
  }
  return target[best] >= tmax - 1e-9;
}

struct SplitStats {
  double group_acc = 0, group_ce = 0, expert_acc = 0;
  int64_t lines = 0, expert_lines = 0;
};

json stats_json(const SplitStats& s, bool experts) {
  json j = {{"group_accuracy", s.group_acc}, {"group_cross_entropy", s.group_ce}, {"lines", s.lines}};
  if (experts) j["expert_accuracy"] = s.expert_lines ? json(s.expert_acc) : json(nullptr);
  return j;
}

std::string fmt_num(double v) { return fmt::format("{:.6g}", v); }

}  // namespace

Runner add_fit_router(CLI::App& app) {
  struct Opts {
    std::string bundle, data, test, out, report, dtype, seed = "0", features = "target";
    double holdout = 0.2, dev = 0.1, l2 = 1e-3;
    int tokens_per_prompt = 16, max_iter = 1000;
    int64_t batch_tokens = 1024;
    std::string lambda_grid = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1";
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--bundle", o->bundle, "Bundle directory (at-moe) whose router to fit")->required();
  app.add_option("--data", o->data, "Labelled JSONL: prompt or messages, and groups or experts {name: weight}")->required();
  app.add_option("--holdout", o->holdout, "Fraction of lines held out for the report (0 .. 0.9; default 0.2, or 0 with --test)");
  app.add_option("--test", o->test, "A separate held-out JSONL for the report (same format as --data)");
  app.add_option("--dev", o->dev, "Fraction of lines for choosing lambda (bundles with a general expert; default 0.1)");
  app.add_option("--lambda-grid", o->lambda_grid, "Lambda values tried on the dev lines (comma list in [0, 1])");
  app.add_option("--l2", o->l2, "L2 penalty on the standardised weights (default 1e-3)");
  app.add_option("--features", o->features,
                 "target (default): router inputs taken with each line's target experts applied; base: with no expert");
  app.add_option("--seed", o->seed, "Seed of the split (default 0)");
  app.add_option("--tokens-per-prompt", o->tokens_per_prompt, "per_token routers: rows kept per prompt (default 16)");
  app.add_option("--max-iter", o->max_iter, "L-BFGS iterations per gate at most (default 1000)");
  app.add_option("--batch-tokens", o->batch_tokens, "Prompt tokens per forward pass (default 1024)");
  app.add_option("--out", o->out, "Router file to write (default: the bundle's router.file)");
  app.add_option("--report", o->report, "Report JSON to write (default: OUT without .safetensors + .fit.json; an .svg beside)");
  app.add_option("--dtype", o->dtype, "bf16 (default) or f32: the dtype the features are computed in");
  return [o, &app]() -> int {
    const uint64_t seed = parse_u64_flag("--seed", o->seed);
    ATMOE_CHECK_INPUT(std::isfinite(o->holdout) && o->holdout >= 0 && o->holdout <= 0.9, "--holdout {}: must be in [0, 0.9]", o->holdout);
    ATMOE_CHECK_INPUT(std::isfinite(o->dev) && o->dev >= 0 && o->dev <= 0.5, "--dev {}: must be in [0, 0.5]", o->dev);
    ATMOE_CHECK_INPUT(std::isfinite(o->l2) && o->l2 > 0 && o->l2 <= 1e6, "--l2 {}: must be in (0, 1e6]", o->l2);
    ATMOE_CHECK_INPUT(o->tokens_per_prompt >= 1 && o->tokens_per_prompt <= 4096, "--tokens-per-prompt {}: must be in 1..4096", o->tokens_per_prompt);
    ATMOE_CHECK_INPUT(o->max_iter >= 1 && o->max_iter <= 100000, "--max-iter {}: must be in 1..100000", o->max_iter);
    ATMOE_CHECK_INPUT(o->batch_tokens >= 1 && o->batch_tokens <= (int64_t(1) << 20), "--batch-tokens {}: must be in 1..1048576", o->batch_tokens);
    std::vector<double> grid;
    {
      size_t p = 0;
      const std::string& s = o->lambda_grid;
      while (p <= s.size()) {
        size_t q = s.find(',', p);
        if (q == std::string::npos) q = s.size();
        const std::string v = s.substr(p, q - p);
        char* end = nullptr;
        const double x = std::strtod(v.c_str(), &end);
        ATMOE_CHECK_INPUT(!v.empty() && end && *end == 0 && std::isfinite(x) && x >= 0 && x <= 1,
                          "--lambda-grid '{}': '{}' is not a number in [0, 1]", s, v);
        grid.push_back(x);
        p = q + 1;
      }
    }
    Bundle b = load_bundle_manifest(o->bundle);
    ATMOE_CHECK_INPUT(b.method == "at-moe", "fit-router: {} is a {} bundle; its router is fitted by fit-intuition (centroids)",
                      o->bundle, b.method);
    if (o->out.empty()) o->out = b.router_file;
    if (o->report.empty()) {
      std::string stem = o->out;
      if (stem.ends_with(".safetensors")) stem.resize(stem.size() - 12);
      o->report = stem + ".fit.json";
    }
    const std::string svg_path =
        (o->report.ends_with(".json") ? o->report.substr(0, o->report.size() - 5) : o->report) + ".svg";
    require_writable_file(o->out, "--out");
    require_writable_file(o->report, "--report");
    auto model = Model::load(b.base_model, parse_dtype_flag(o->dtype));
    const auto& cfg = model->config();
    const int L = cfg.n_layers, G = int(b.groups.size()), E = int(b.experts.size());
    const int64_t d = cfg.hidden;
    DataFile df = read_data(o->data, *model, &b, 0);
    const size_t N_data = df.lines.size();
    // --test: a separate held-out file (e.g. held-out instruction templates); --data then
    // has no held-out part unless --holdout is given too.
    DataFile tf;
    if (!o->test.empty()) tf = read_data(o->test, *model, &b, 0);
    const double holdout = o->test.empty() || app.count("--holdout") ? o->holdout : 0.0;

    // Split: test (held out), dev (lambda), train.
    const bool fit_lambda = b.general.has_value() &&
                            std::any_of(df.lines.begin(), df.lines.end(), [](const FitLine& l) { return !l.completion.empty(); });
    const auto perm = permutation(N_data, seed);
    const size_t n_hold = size_t(std::llround(holdout * double(N_data)));
    const size_t n_dev = fit_lambda ? size_t(std::llround(o->dev * double(N_data))) : 0;
    ATMOE_CHECK_INPUT(N_data >= n_hold + n_dev + 2, "{}: {} lines leave fewer than 2 to fit on after --holdout {} and --dev {}",
                      o->data, N_data, holdout, n_dev ? o->dev : 0.0);
    std::vector<int> split(N_data, 0);  // 0 train, 1 dev, 2 test
    for (size_t k = 0; k < n_hold; ++k) split[perm[k]] = 2;
    for (size_t k = n_hold; k < n_hold + n_dev; ++k) split[perm[k]] = 1;
    for (auto& l : tf.lines) {
      df.lines.push_back(std::move(l));
      split.push_back(2);
    }
    const size_t N = df.lines.size(), n_test = n_hold + tf.lines.size();
    // Every group (and, where expert targets exist, every expert of those groups) needs
    // training weight: an unseen class has no finite fit.
    std::vector<double> gmass(size_t(G), 0.0), emass(size_t(E), 0.0);
    std::vector<bool> g_expert(size_t(G), false);
    for (size_t i = 0; i < N; ++i) {
      if (split[i] != 0) continue;
      for (int g = 0; g < G; ++g) gmass[size_t(g)] += df.lines[i].group_t[size_t(g)];
      if (!df.lines[i].expert_t.empty())
        for (int e = 0; e < E; ++e)
          if (df.lines[i].expert_t[size_t(e)] > 0) {
            emass[size_t(e)] += df.lines[i].expert_t[size_t(e)];
            g_expert[size_t(b.experts[size_t(e)].group)] = true;
          }
    }
    if (G > 1)
      for (int g = 0; g < G; ++g)
        ATMOE_CHECK_INPUT(gmass[size_t(g)] > 0, "{}: group '{}' has no target weight in the {} training lines; every group needs examples",
                          o->data, b.groups[size_t(g)].name, N - n_test - n_dev);
    for (int e = 0; e < E; ++e) {
      const int g = b.experts[size_t(e)].group;
      ATMOE_CHECK_INPUT(!g_expert[size_t(g)] || b.groups[size_t(g)].experts.size() < 2 || emass[size_t(e)] > 0,
                        "{}: expert '{}' has no target weight in the training lines, but its group '{}' has expert "
                        "targets; give it examples or label that group's lines by group",
                        o->data, b.experts[size_t(e)].name, b.groups[size_t(g)].name);
    }

    std::vector<size_t> train, dev, test;
    for (size_t i = 0; i < N; ++i) (split[i] == 0 ? train : split[i] == 1 ? dev : test).push_back(i);
    if (fit_lambda) {
      dev.erase(std::remove_if(dev.begin(), dev.end(), [&](size_t i) { return df.lines[i].completion.empty(); }), dev.end());
      ATMOE_CHECK_INPUT(!dev.empty(), "{}: none of the {} dev lines has a completion (--dev {}); lambda needs some",
                        o->data, n_dev, o->dev);
    }

    // Features with the targets pinned (the router's own weights are never used: a zero router),
    // the general expert blended at `lam` (nullopt: the bundle's lambda).
    const bool per_token = b.router_input == RouterInput::PerToken;
    ATMOE_LOG("fit")->info("{} lines ({} train, {} dev, {} held out), {} groups, {} experts, router input {}", N,
                           train.size(), n_dev, n_test, G, E, per_token ? "per_token" : "per_request");
    ATMOE_CHECK_INPUT(o->features == "target" || o->features == "base", "--features '{}': expected target or base", o->features);
    Features f;
    double t_feat = 0;
    std::vector<int64_t> line_rows(N, 0);  // row weights: each line counts once, whatever its number of rows
    auto gather = [&](std::optional<double> lam) {
      const double t0 = now_s();
      auto pool = std::make_unique<ExpertPool>(b, cfg, model->dtype(), /*zero_router=*/true);
      model->set_experts(pool.get());
      f = gather_features(*model, *pool, df.lines, train, per_token ? o->tokens_per_prompt : 1, o->batch_tokens,
                          o->features == "base", lam);
      t_feat += now_s() - t0;
      model->set_experts(nullptr);
      pool.reset();  // its experts' weights; the fitted pool below loads them again
      std::fill(line_rows.begin(), line_rows.end(), 0);
      for (size_t r : f.row_line) ++line_rows[r];
    };
    gather(std::nullopt);

    // Per layer: the group gate over all groups, and an expert gate inside each group that
    // has expert targets (other groups keep W_D = 0: a uniform mix).
    SoftmaxFitOptions fo;
    fo.l2 = o->l2;
    fo.max_iter = o->max_iter;
    std::vector<std::vector<float>> WG(size_t(L), std::vector<float>(size_t(G * d), 0.f)), BG(size_t(L), std::vector<float>(size_t(G), 0.f));
    std::vector<std::vector<float>> WD(size_t(L), std::vector<float>(size_t(E * d), 0.f)), BD(size_t(L), std::vector<float>(size_t(E), 0.f));
    json fit_layers = json::array();
    int not_converged = 0;
    double t_fit = 0;
    auto fit_all = [&]() {
    const double t1 = now_s();
    fit_layers = json::array();
    not_converged = 0;
    for (int l = 0; l < L; ++l) {
      json jl = {{"layer", l}};
      auto fit_gate = [&](const std::vector<int>& classes, bool expert_level, int group, std::vector<float>& W,
                          std::vector<float>& B, double tau) {
        const int C = int(classes.size());
        std::vector<double> X, Y, w;
        for (int64_t r = 0; r < f.rows; ++r) {
          const size_t li = f.row_line[size_t(r)];
          const FitLine& ln = df.lines[li];
          double mass = 1;
          if (expert_level) {
            if (ln.expert_t.empty() || !(ln.group_t[size_t(group)] > 0)) continue;
            mass = ln.group_t[size_t(group)];
          }
          for (int k = 0; k < C; ++k)
            Y.push_back(expert_level ? ln.expert_t[size_t(classes[size_t(k)])] / mass : ln.group_t[size_t(classes[size_t(k)])]);
          X.insert(X.end(), f.x[size_t(l)].begin() + r * d, f.x[size_t(l)].begin() + (r + 1) * d);
          w.push_back(mass / double(line_rows[li]));
        }
        const int64_t n = int64_t(w.size());
        const SoftmaxFit s = fit_softmax_regression(X.data(), n, d, Y.data(), C, w.data(), fo);
        not_converged += !s.converged;
        // The router divides logits by tau: scale so that the bundle's tau gives the fit.
        const double scale = tau > 0 ? tau : 1.0;
        for (int k = 0; k < C; ++k) {
          const int row = classes[size_t(k)];
          for (int64_t j = 0; j < d; ++j) W[size_t(row * d + j)] = float(scale * s.W[size_t(k * d + j)]);
          B[size_t(row)] = float(scale * s.b[size_t(k)]);
        }
        return json{{"rows", n}, {"iterations", s.iterations}, {"converged", s.converged}, {"loss", s.loss},
                    {"grad_max", s.grad_max}};
      };
      if (G > 1) {
        std::vector<int> all(static_cast<size_t>(G));
        for (int g = 0; g < G; ++g) all[size_t(g)] = g;
        jl["group_gate"] = fit_gate(all, false, -1, WG[size_t(l)], BG[size_t(l)], b.tau_group);
      }
      for (int g = 0; g < G; ++g)
        if (g_expert[size_t(g)] && b.groups[size_t(g)].experts.size() >= 2)
          jl["expert_gate." + b.groups[size_t(g)].name] =
              fit_gate(b.groups[size_t(g)].experts, true, g, WD[size_t(l)], BD[size_t(l)], b.tau_expert);
      fit_layers.push_back(std::move(jl));
    }
    t_fit += now_s() - t1;
    };
    fit_all();
    if (not_converged)
      ATMOE_LOG("fit")->info("{} gates ended before the gradient fell below {} (--max-iter {}, or no decrease left in "
                             "float64); the report lists each gate's final gradient",
                             not_converged, fo.grad_tol, o->max_iter);
    const bool has_expert_t = std::any_of(df.lines.begin(), df.lines.end(), [](const FitLine& l) { return !l.expert_t.empty(); });

    // The router file (provenance in __metadata__), first as OUT.tmp: lambda and the
    // held-out report run through it, then it is renamed over OUT.
    std::vector<SafetensorsWriteItem> items;
    for (int l = 0; l < L; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      items.push_back({p + "group_gate.weight", DType::F32, {G, d}, WG[size_t(l)].data()});
      items.push_back({p + "group_gate.bias", DType::F32, {G}, BG[size_t(l)].data()});
      items.push_back({p + "expert_gate.weight", DType::F32, {E, d}, WD[size_t(l)].data()});
      items.push_back({p + "expert_gate.bias", DType::F32, {E}, BD[size_t(l)].data()});
    }
    const std::string tmp = o->out + ".tmp";
    std::map<std::string, std::string> meta = {
        {"atmoe_fit", "fit-router"},
        {"atmoe_build", build_id()},
        {"data_file", fs::path(o->data).filename().string()},
        {"data_sha256", df.sha256},
        {"data_lines", std::to_string(N_data)},
        {"train_lines", std::to_string(train.size())},
        {"dev_lines", std::to_string(n_dev)},
        {"heldout_lines", std::to_string(n_test)},
        {"seed", std::to_string(seed)},
        {"l2", fmt_num(o->l2)},
        {"router_input", per_token ? "per_token" : "per_request"},
        {"features", o->features},
    };
    if (!o->test.empty()) {
      meta["heldout_file"] = fs::path(o->test).filename().string();
      meta["heldout_sha256"] = tf.sha256;
    }
    write_safetensors(tmp, items, meta);
    struct TmpGuard {
      std::string path;
      ~TmpGuard() {
        std::error_code ec;
        fs::remove(path, ec);
      }
    } guard{tmp};
    Bundle bf = b;
    bf.router_file = tmp;
    auto fitted = std::make_unique<ExpertPool>(bf, cfg, model->dtype());
    model->set_experts(fitted.get());

    // Training lines: teacher-forced (their features, the fitted router applied through the
    // Router inference uses); per_token rows averaged over the prompt.
    auto score = [&](SplitStats& s, const FitLine& ln, const double* a, const double* w) {
      s.group_acc += argmax_in_target(a, ln.group_t.data(), G);
      double ce = 0;
      for (int g = 0; g < G; ++g)
        if (ln.group_t[size_t(g)] > 0) ce -= ln.group_t[size_t(g)] * clamp_log(a[g]);
      s.group_ce += ce;
      ++s.lines;
      if (!ln.expert_t.empty()) {
        s.expert_acc += argmax_in_target(w, ln.expert_t.data(), E);
        ++s.expert_lines;
      }
    };
    auto finish = [](std::vector<SplitStats>& v) {
      for (auto& s : v) {
        if (s.lines) s.group_acc /= double(s.lines), s.group_ce /= double(s.lines);
        if (s.expert_lines) s.expert_acc /= double(s.expert_lines);
      }
    };
    std::vector<SplitStats> st_train(static_cast<size_t>(L)), st_test(static_cast<size_t>(L));
    auto train_stats = [&]() {
      st_train.assign(size_t(L), SplitStats{});
      const ResolvedRouting rr = resolve_routing(bf, RoutingControls{});
      const Router& router = fitted->router();
      std::vector<double> a(static_cast<size_t>(G)), w(static_cast<size_t>(E));
      for (int l = 0; l < L; ++l) {
        std::map<size_t, std::pair<std::vector<double>, std::vector<double>>> mean;
        for (int64_t r = 0; r < f.rows; ++r) {
          const size_t li = f.row_line[size_t(r)];
          router.route(l, f.x[size_t(l)].data() + r * d, rr, a.data(), w.data());
          auto& [ma, mw] = mean[li];
          ma.resize(size_t(G)), mw.resize(size_t(E));
          for (int g = 0; g < G; ++g) ma[size_t(g)] += a[size_t(g)] / double(line_rows[li]);
          for (int e = 0; e < E; ++e) mw[size_t(e)] += w[size_t(e)] / double(line_rows[li]);
        }
        for (const auto& [li, v] : mean) score(st_train[size_t(l)], df.lines[li], v.first.data(), v.second.data());
      }
      finish(st_train);
    };
    train_stats();

    // Lambda on the dev lines: the mean negative log-likelihood per token of their
    // completions with the fitted router, free-running, for each value of the grid.
    json lambda_j = nullptr;
    double lambda = b.lambda;
    if (fit_lambda) {
      json tried = json::array();
      double best = INFINITY;
      std::vector<float> logits;
      const int64_t V = cfg.vocab;
      cpu::TokenLogprob lp;
      std::vector<std::pair<float, int32_t>> scratch;
      for (double lam : grid) {
        double nll = 0;
        int64_t ntok = 0;
        for (size_t i0 = 0; i0 < dev.size(); i0 += 16) {
          const size_t i1 = std::min(dev.size(), i0 + 16);
          std::vector<std::unique_ptr<KvCache>> caches;
          std::vector<std::unique_ptr<SeqRouting>> routes;
          std::vector<ForwardItem> pre, comp;
          for (size_t k = i0; k < i1; ++k) {
            const FitLine& ln = df.lines[dev[k]];
            RoutingControls c;
            c.lambda = lam;
            caches.push_back(model->new_cache());
            routes.push_back(fitted->new_routing(c));
            pre.push_back({caches.back().get(), ln.prompt.data(), int64_t(ln.prompt.size()), LogitsMode::Last, routes.back().get()});
          }
          // The prompt alone first (per_request routing sees only the prompt): its last row
          // predicts the first completion token; then the completion's rows (all but its last
          // token fed) predict the rest.
          model->forward(pre, logits);
          fitted->end_step();
          for (size_t k = i0; k < i1; ++k) {
            cpu::logprobs(logits.data() + int64_t(k - i0) * V, V, df.lines[dev[k]].completion[0], 0, lp, scratch);
            nll -= lp.logprob;
            ++ntok;
          }
          for (size_t k = i0; k < i1; ++k) {
            const FitLine& ln = df.lines[dev[k]];
            if (ln.completion.size() > 1)
              comp.push_back({caches[k - i0].get(), ln.completion.data(), int64_t(ln.completion.size()) - 1, LogitsMode::All,
                              routes[k - i0].get()});
          }
          if (comp.empty()) continue;
          model->forward(comp, logits);
          fitted->end_step();
          int64_t off = 0;
          for (size_t k = i0; k < i1; ++k) {
            const FitLine& ln = df.lines[dev[k]];
            for (size_t t = 1; t < ln.completion.size(); ++t, ++off, ++ntok) {
              cpu::logprobs(logits.data() + off * V, V, ln.completion[t], 0, lp, scratch);
              nll -= lp.logprob;
            }
          }
        }
        const double mean = nll / double(std::max<int64_t>(1, ntok));
        tried.push_back({{"lambda", lam}, {"nll", mean}, {"tokens", ntok}});
        ATMOE_LOG("fit")->info("lambda {}: dev completion NLL {:.4f} per token ({} tokens)", lam, mean, ntok);
        if (mean < best) best = mean, lambda = lam;
      }
      lambda_j = {{"chosen", lambda}, {"dev_lines", dev.size()}, {"tried", tried}, {"features_lambda", b.lambda}};
      meta["lambda"] = fmt_num(lambda);
      // The features were taken with the general expert at the bundle's lambda; at another
      // lambda the router's inputs are shaped differently: take them again at the chosen one
      // and refit once (lambda is not chosen again), so the router is fitted on the inputs
      // it will see.
      if (lambda != b.lambda && o->features == "target") {
        ATMOE_LOG("fit")->info("lambda {} differs from the bundle's {}: features again at {} and a refit", lambda,
                               b.lambda, lambda);
        model->set_experts(nullptr);
        fitted.reset();
        gather(lambda);
        fit_all();
        write_safetensors(tmp, items, meta);
        fitted = std::make_unique<ExpertPool>(bf, cfg, model->dtype());
        model->set_experts(fitted.get());
        train_stats();
        lambda_j["features_lambda"] = lambda;
        lambda_j["refit"] = true;
      }
    }

    // Held-out lines: free-running, as at inference (the fitted router routes every layer
    // from inputs that its own earlier choices shaped), with the chosen lambda.
    std::map<std::string, std::pair<double, int64_t>> task_acc;
    run_prompts(
        *model, *fitted, df.lines, test, o->batch_tokens,
        [&](const FitLine&) {
          RoutingControls c;
          if (b.general) c.lambda = lambda;
          return fitted->new_routing(c);
        },
        [&](size_t li, const SeqRouting& r) {
          const FitLine& ln = df.lines[li];
          for (int l = 0; l < L; ++l) {
            score(st_test[size_t(l)], ln, r.a[size_t(l)].data(), r.w[size_t(l)].data());
            if (!ln.task.empty()) {
              task_acc[ln.task].first += argmax_in_target(r.a[size_t(l)].data(), ln.group_t.data(), G);
              task_acc[ln.task].second += 1;
            }
          }
        },
        "held-out");
    finish(st_test);

    // The final file: the same tensors, with the summary in the metadata.
    double acc_mean = 0;
    for (int l = 0; l < L; ++l) acc_mean += st_test[size_t(l)].group_acc;
    acc_mean = std::min(1.0, acc_mean / L);
    if (n_test) {
      meta["heldout_group_accuracy_mean"] = fmt_num(acc_mean);
      meta["heldout_group_accuracy_last"] = fmt_num(st_test[size_t(L - 1)].group_acc);
    }
    write_safetensors(tmp, items, meta);
    fs::rename(tmp, o->out);
    std::error_code ec;
    if (fit_lambda && lambda != b.lambda && fs::equivalent(o->out, b.router_file, ec)) {
      // The chosen lambda goes into atmoe.json's "lambda" (key order kept), when the router
      // written is the bundle's own; otherwise the report carries it.
      nlohmann::ordered_json man = nlohmann::ordered_json::parse(read_file(b.manifest, "bundle manifest"));
      man["lambda"] = lambda;
      write_file(b.manifest, man.dump(1) + "\n", "bundle manifest");
    }

    // Report.
    json layers = json::array();
    for (int l = 0; l < L; ++l) {
      json j = fit_layers[size_t(l)];
      j["train"] = stats_json(st_train[size_t(l)], has_expert_t);
      if (n_test) j["heldout"] = stats_json(st_test[size_t(l)], has_expert_t);
      layers.push_back(std::move(j));
    }
    json tasks = json::object();
    for (const auto& [t, v] : task_acc)
      tasks[t] = {{"heldout_group_accuracy_mean_over_layers", v.first / double(v.second)}, {"lines", v.second / L}};
    json rep = {{"bundle", o->bundle},
                {"router_file", o->out},
                {"data", {{"file", o->data}, {"sha256", df.sha256}, {"lines", N_data}, {"bytes", df.bytes}}},
                {"heldout_file", o->test.empty() ? json(nullptr) : json({{"file", o->test}, {"sha256", tf.sha256}, {"lines", tf.lines.size()}})},
                {"split", {{"seed", seed}, {"train", train.size()}, {"dev", n_dev}, {"heldout", n_test}}},
                {"router_input", per_token ? "per_token" : "per_request"},
                {"features", o->features},
                {"rows", f.rows},
                {"l2", o->l2},
                {"train_stats", "teacher-forced: the training lines' features (targets pinned) through the fitted router"},
                {"heldout_stats", "free-running: the held-out prompts routed by the fitted router, as at inference"},
                {"seconds", {{"features", t_feat}, {"fit", t_fit}}},
                {"heldout_group_accuracy_mean", n_test ? json(acc_mean) : json(nullptr)},
                {"tasks", tasks},
                {"lambda", lambda_j},
                {"layers", layers}};
    write_file(o->report, rep.dump(1) + "\n", "--report");
    std::vector<double> tr_acc, te_acc, tr_ce, te_ce;
    for (int l = 0; l < L; ++l) {
      tr_acc.push_back(st_train[size_t(l)].group_acc);
      tr_ce.push_back(st_train[size_t(l)].group_ce);
      te_acc.push_back(n_test ? st_test[size_t(l)].group_acc : NAN);
      te_ce.push_back(n_test ? st_test[size_t(l)].group_ce : NAN);
    }
    write_file(svg_path,
               fit_report_svg(fmt::format("fit-router: {} ({} lines, {} held out)", fs::path(o->data).filename().string(), N, n_test),
                              tr_acc, te_acc, tr_ce, te_ce),
               "--report");
    std::cerr << fmt::format("fitted {} layers x {} groups ({} rows) in {:.1f} s (features {:.1f} s); wrote {}\n", L, G, f.rows,
                             t_fit, t_feat, o->out);
    if (n_test)
      std::cerr << fmt::format("held-out group accuracy (free-running): mean over layers {:.3f}, last layer {:.3f} ({} lines)\n",
                               acc_mean, st_test[size_t(L - 1)].group_acc, n_test);
    if (fit_lambda) std::cerr << fmt::format("lambda {} (chosen on {} dev lines)\n", lambda, dev.size());
    std::cerr << "report: " << o->report << ", " << svg_path << "\n";
    return 0;
  };
}

Runner add_fit_intuition(CLI::App& app) {
  struct Opts {
    std::string bundle, data, out, dtype, seed = "0";
    int clusters = 32, max_iter = 300, restarts = 4;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--bundle", o->bundle, "T-REX bundle directory whose centroids to fit")->required();
  app.add_option("--data", o->data, "JSONL: prompt, messages or embedding per line")->required();
  app.add_option("--clusters", o->clusters, "K, the number of centroids (the released T-REX uses 32)")->required();
  app.add_option("--seed", o->seed, "Seed of the k-means++ seeding (default 0)");
  app.add_option("--max-iter", o->max_iter, "Lloyd iterations at most (default 300)");
  app.add_option("--restarts", o->restarts, "k-means++ runs; the lowest inertia is kept (default 4)");
  app.add_option("--out", o->out, "Centroids file to write (default: the bundle's t_rex.centroids)");
  app.add_option("--dtype", o->dtype, "bf16 (default) or f32: the dtype of the forward pass");
  return [o]() -> int {
    const uint64_t seed = parse_u64_flag("--seed", o->seed);
    ATMOE_CHECK_INPUT(o->clusters >= 1 && o->clusters <= 65536, "--clusters {}: must be in 1..65536", o->clusters);
    ATMOE_CHECK_INPUT(o->max_iter >= 1 && o->max_iter <= 100000, "--max-iter {}: must be in 1..100000", o->max_iter);
    ATMOE_CHECK_INPUT(o->restarts >= 1 && o->restarts <= 1000, "--restarts {}: must be in 1..1000", o->restarts);
    Bundle b = load_bundle_manifest(o->bundle);
    ATMOE_CHECK_INPUT(b.method == "t-rex", "fit-intuition: {} is a {} bundle; its router is fitted by fit-router", o->bundle, b.method);
    if (o->out.empty()) o->out = b.trex->centroids_file;
    ATMOE_CHECK_INPUT(o->out.ends_with(".safetensors"),
                      "--out {}: centroids are written as .safetensors (key \"centroids\")", o->out);
    require_writable_file(o->out, "--out");
    auto model = Model::load(b.base_model, parse_dtype_flag(o->dtype));
    const auto& cfg = model->config();
    // The dimension of the embedding: the hidden size, or the request embeddings' (as the
    // existing centroids say; a bundle fitted from scratch with embeddings needs them).
    int64_t de = cfg.hidden;
    if (!b.trex->intuition_from_hidden) {
      ATMOE_CHECK_INPUT(fs::exists(b.trex->centroids_file),
                        "fit-intuition: {} takes its intuition from request embeddings, and their dimension comes from "
                        "the existing centroids file {}, which is missing",
                        o->bundle, b.trex->centroids_file);
      de = load_centroids(b.trex->centroids_file).dim(1);
    }
    {
      // K is fixed by the experts: the mapper's inputs, else one centroid per expert (or per
      // rank for square rank1_flex), as TrexPool checks at load.
      const TrexAdapter a = load_trex_adapter(b.trex->adapter_dir, site_shapes(cfg));
      std::vector<int> ok;
      if (a.mapper) {
        ok.push_back(int(a.modules.begin()->second.M.dim(1)));
      } else {
        ok.push_back(a.E);
        if (a.mode == "rank1_flex" && a.r1 == a.r2 && a.E == a.r1 * a.r1) ok.push_back(a.r1);
      }
      ATMOE_CHECK_INPUT(std::find(ok.begin(), ok.end(), o->clusters) != ok.end(),
                        "--clusters {}: the experts of {} take an intuition of {} entries, so K must be {}{}", o->clusters,
                        o->bundle, a.mapper ? ok[0] : a.E, ok[0], ok.size() > 1 ? fmt::format(" or {}", ok[1]) : "");
    }
    DataFile df = read_data(o->data, *model, nullptr, de);
    const int64_t n = int64_t(df.lines.size());
    ATMOE_CHECK_INPUT(n >= o->clusters, "{}: {} lines for {} clusters; need at least as many lines as clusters", o->data, n, o->clusters);
    // The intuition embedding of each line, L2-normalised as TrexPool::cluster_scores takes it.
    std::vector<double> X(size_t(n * de));
    const double t0 = now_s();
    for (int64_t i = 0; i < n; ++i) {
      const FitLine& l = df.lines[size_t(i)];
      std::vector<float> e;
      if (!l.embedding.empty()) {
        e = l.embedding;
      } else {
        ATMOE_CHECK_INPUT(b.trex->intuition_from_hidden, "{}:{}: {} takes request embeddings: give \"embedding\", not a prompt",
                          o->data, l.line, o->bundle);
        e = model->pooled_hidden(l.prompt.data(), int64_t(l.prompt.size()), b.trex->hidden_layer);
      }
      ATMOE_CHECK_INPUT(int64_t(e.size()) == de, "{}:{}: embedding has {} values, expected {}", o->data, l.line, e.size(), de);
      double nrm = 0;
      for (float v : e) nrm += double(v) * v;
      ATMOE_CHECK_INPUT(std::isfinite(nrm) && nrm > 0, "{}:{}: the embedding is zero or not finite", o->data, l.line);
      for (int64_t j = 0; j < de; ++j) X[size_t(i * de + j)] = e[size_t(j)] / std::sqrt(nrm);
    }
    const double t_emb = now_s() - t0;
    const KMeansResult km = kmeans(X.data(), n, de, o->clusters, seed, o->max_iter, o->restarts);
    const auto empty = std::count(km.sizes.begin(), km.sizes.end(), int64_t(0));
    ATMOE_CHECK_INPUT(empty == 0, "{}: {} of the {} clusters stay empty: the data has fewer distinct embeddings than --clusters",
                      o->data, empty, o->clusters);
    std::vector<float> cen(km.centroids.begin(), km.centroids.end());
    std::string sizes;
    for (int64_t s : km.sizes) sizes += (sizes.empty() ? "" : ",") + std::to_string(s);
    const std::map<std::string, std::string> meta = {
        {"atmoe_fit", "fit-intuition"},
        {"atmoe_build", build_id()},
        {"data_file", fs::path(o->data).filename().string()},
        {"data_sha256", df.sha256},
        {"data_lines", std::to_string(n)},
        {"seed", std::to_string(seed)},
        {"source", b.trex->intuition_from_hidden ? "hidden_state layer " + std::to_string(b.trex->hidden_layer) : "embedding"},
        {"inertia", fmt_num(km.inertia)},
        {"iterations", std::to_string(km.iterations)},
        {"converged", km.converged ? "true" : "false"},
        {"cluster_sizes", sizes},
    };
    const std::string tmp = o->out + ".tmp";
    write_safetensors(tmp, {{"centroids", DType::F32, {o->clusters, de}, cen.data()}}, meta);
    fs::rename(tmp, o->out);
    std::cerr << fmt::format("k-means++: {} embeddings of dimension {} ({:.1f} s) into {} clusters, {} Lloyd iterations{}, "
                             "inertia {:.6g}; sizes {}; wrote {}\n",
                             n, de, t_emb, o->clusters, km.iterations, km.converged ? "" : " (not converged)", km.inertia,
                             sizes, o->out);
    return 0;
  };
}

}  // namespace atmoe::app
