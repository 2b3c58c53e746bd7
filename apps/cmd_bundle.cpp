// Bundle commands: `atmoe synth-bundle` (a deterministic bundle of random PEFT experts and
// routers for a given base model) and the bundle branch of `atmoe inspect`.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "apps/commands.h"
#include "common/bundle.h"
#include "common/error.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "apps/routing_flags.h"
#include "coordinator/engine.h"
#include "coordinator/experts.h"
#include "coordinator/explain_svg.h"
#include "coordinator/model.h"
#include "coordinator/synth_bundle.h"
#include "coordinator/trex_pool.h"

namespace atmoe::app {

Runner add_synth_bundle(CLI::App& app) {
  auto o = std::make_shared<SynthBundleOptions>();
  app.add_option("--base", o->base, "Base model (.gguf or HF dir)")->required();
  app.add_option("--out", o->out, "Output bundle directory")->required();
  app.add_option("--groups", o->groups, "Expert groups");
  app.add_option("--experts-per-group", o->per_group, "Experts per group");
  app.add_option("--rank", o->ranks, "LoRA rank, or a comma list cycled over experts (heterogeneous ranks)");
  app.add_option("--targets", o->targets, "Adapted modules: q,k,v,o,gate,up,down");
  auto seed = std::make_shared<std::string>();
  app.add_option("--seed", *seed, "Random seed, 0..18446744073709551615")->required();
  app.add_option("--method", o->method, "at-moe (default) or t-rex");
  app.add_option("--trex-mode", o->trex_mode, "t-rex: rank1 or rank1_flex (default; --rank r1,r2)");
  app.add_flag("--router-mapping", o->router_mapping, "t-rex: a learned mapper from 32 centroids to the experts");
  app.add_option("--intuition", o->intuition, "t-rex: hidden_state (default) or embedding");
  app.add_option("--intuition-layer", o->intuition_layer, "t-rex: base layer whose pooled hidden state is the embedding");
  app.add_option("--embedding-dim", o->embedding_dim, "t-rex: embedding dimension for --intuition embedding");
  app.add_option("--router-input", o->input, "per_request (default) or per_token");
  app.add_flag("--general", o->general, "Add a general expert (lambda 0.8)");
  app.add_option("--b-std", o->b_std, "Standard deviation of lora_B entries (small keeps the base fluent)");
  app.add_option("--router-gain", o->router_gain, "Scale of the router weights (larger = sharper routing)");
  auto force = std::make_shared<bool>(false);
  app.add_flag("--force", *force, "Write into an existing non-empty --out directory");
  return [o, force, seed, &app]() -> int {
    o->seed = parse_u64_flag("--seed", *seed);
    // Flags of the other method would be ignored: refuse them.
    const bool trex = o->method == "t-rex";
    for (const char* f : trex ? std::vector<const char*>{"--groups", "--experts-per-group", "--router-input", "--general"}
                              : std::vector<const char*>{"--trex-mode", "--router-mapping", "--intuition", "--intuition-layer",
                                                         "--embedding-dim"})
      ATMOE_CHECK_INPUT(app.count(f) == 0, "synth-bundle: {} does not apply to --method {}", f, o->method);
    prepare_output_dir(o->out, *force, "--out");
    synth_bundle(*o);
    if (o->method == "t-rex") std::cerr << "wrote bundle " << o->out << ": t-rex " << o->trex_mode << "\n";
    else std::cerr << "wrote bundle " << o->out << ": " << o->groups << " groups x " << o->per_group << " experts\n";
    return 0;
  };
}

Runner add_explain(CLI::App& app) {
  struct Opts {
    std::string bundle, prompt, out = "routing.svg", dtype, system;
    bool chat = false;
    RoutingFlags rf;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--bundle", o->bundle, "Expert bundle directory")->required();
  app.add_option("--prompt", o->prompt, "Prompt to route")->required();
  app.add_option("--out", o->out, "SVG file to write");
  app.add_flag("--chat", o->chat, "Wrap the prompt in the chat template");
  app.add_option("--system", o->system, "System message (with --chat)");
  app.add_option("--dtype", o->dtype, "bf16 (default) or f32");
  add_routing_flags(app, o->rf);
  return [o]() -> int {
    ATMOE_CHECK_INPUT(o->chat || o->system.empty(), "--system applies to the chat template: give --chat too");
    const RoutingControls controls = to_controls(o->rf);
    require_writable_file(o->out, "--out");
    ATMOE_CHECK_INPUT(!controls.off, "explain: --routing off has no weights to draw");
    Bundle b = load_bundle_manifest(o->bundle);
    ATMOE_CHECK_INPUT(b.method == "at-moe", "explain: {} is a {} bundle; the heatmap draws at-moe routing (use generate --trace)",
                      o->bundle, b.method);
    (void)resolve_routing(b, controls);
    auto model = Model::load(b.base_model, parse_dtype_flag(o->dtype));
    ExpertPool pool(b, model->config(), model->dtype());
    model->set_experts(&pool);
    GenerateRequest r;
    r.prompt = encode_prompt(*model, o->prompt, o->chat, o->system);
    ATMOE_CHECK_INPUT(!r.prompt.empty(), "explain: the prompt is empty after tokenization");
    r.max_tokens = 1;
    r.routing = controls;
    Engine eng(*model);
    auto res = eng.run({r});
    std::string title = o->prompt.size() > 70 ? o->prompt.substr(0, 67) + "..." : o->prompt;
    write_file(o->out, routing_heatmap_svg(pool.bundle(), *res[0].routing, "\"" + title + "\""), "--out");
    std::cerr << "wrote " << o->out << "\n";
    return 0;
  };
}

// Where a router or centroids file came from, from its __metadata__ (atmoe fit-router,
// fit-intuition and synth-bundle write it).
static std::string router_provenance(const std::map<std::string, std::string>& m) {
  auto get = [&](const char* k) { return m.count(k) ? m.at(k) : std::string("?"); };
  const std::string how = m.count("atmoe_fit") ? m.at("atmoe_fit") : "";
  if (how == "fit-router" || how == "fit-intuition") {
    std::string s = fmt::format("fitted by atmoe {} on {} (sha256 {}, {} lines", how, get("data_file"),
                                get("data_sha256").substr(0, 16), get("data_lines"));
    if (how == "fit-router") {
      s += fmt::format(": {} train, {} dev, {} held out; router input {}", get("train_lines"), get("dev_lines"),
                       get("heldout_lines"), get("router_input"));
      if (m.count("heldout_group_accuracy_mean"))
        s += fmt::format("; held-out group accuracy {} mean over layers, {} last layer", get("heldout_group_accuracy_mean"),
                         get("heldout_group_accuracy_last"));
      if (m.count("lambda")) s += "; lambda " + get("lambda") + " chosen on the dev lines";
    } else {
      s += fmt::format(": {}, inertia {}, cluster sizes {}", get("source"), get("inertia"), get("cluster_sizes"));
    }
    return s + ", build " + get("atmoe_build") + ")";
  }
  if (how == "synth-bundle") return "random weights from atmoe synth-bundle (not fitted)";
  return "no provenance (not written by atmoe fit-router or fit-intuition)";
}

int inspect_bundle(const std::string& dir, bool check_tensors) {
  Bundle b = load_bundle_manifest(dir);
  auto model = Model::load(b.base_model, DType::BF16, check_tensors);
  if (b.method == "t-rex") {
    TrexPool t(b, model->config(), DType::F32);
    const auto& a = t.adapter();
    std::set<int> sites;
    for (const auto& [k, m] : a.modules) sites.insert(int(k.second));
    std::string ss;
    for (int si : sites) ss += std::string(ss.empty() ? "" : ",") + site_name(Site(si));
    std::cout << "bundle:       " << dir << " (method t-rex, " << a.mode << ", r1 " << a.r1 << ", r2 " << a.r2 << ", "
              << a.E << " rank-1 experts per module" << (a.mapper ? ", router mapping" : "") << ")\n";
    std::cout << "base model:   " << b.base_model << ": " << model->config().summary() << "\n";
    std::cout << fmt::format("modules:      {} (targets {}), {:.2f} MiB\n", a.modules.size(), ss, double(a.param_bytes()) / (1 << 20));
    std::cout << fmt::format("intuition:    {} centroids of dimension {}, from {}\n", t.K(), t.d_e(),
                             b.trex->intuition_from_hidden ? "the pooled hidden state of layer " + std::to_string(b.trex->hidden_layer)
                                                           : std::string("a request embedding"));
    if (b.trex->centroids_file.ends_with(".safetensors"))
      std::cout << "centroids:    " << router_provenance(SafetensorsFile(b.trex->centroids_file).metadata()) << "\n";
    return 0;
  }
  (void)Router(b, model->config().n_layers, model->config().hidden);  // checks router.safetensors
  std::cout << "bundle:       " << dir << " (method " << b.method << ", router input "
            << (b.router_input == RouterInput::PerToken ? "per_token" : "per_request") << ", tau_group " << b.tau_group
            << ", tau_expert " << b.tau_expert << ", lambda " << b.lambda << ")\n";
  std::cout << "base model:   " << b.base_model << ": " << model->config().summary() << "\n";
  std::cout << "router:       " << router_provenance(SafetensorsFile(b.router_file).metadata()) << "\n";
  // Each adapter is read, described and dropped: memory stays that of one adapter.
  const SiteShapes shapes = site_shapes(model->config());
  auto describe = [&](const BundleExpert& e, int64_t* bytes) {
    const PeftAdapter a = load_peft_adapter(e.adapter_dir, e.name, shapes);
    std::set<int> ranks;
    for (const auto& [k, w] : a.modules) ranks.insert(w.rank);
    std::string sites;
    for (Site s : a.sites()) sites += std::string(sites.empty() ? "" : ",") + site_name(s);
    std::string rs;
    for (int r : ranks) rs += (rs.empty() ? "" : "/") + std::to_string(r);
    *bytes += a.param_bytes();
    return fmt::format("rank {:<6} targets {:<22} modules {:>4}  {:>9.2f} MiB", rs, sites, a.modules.size(),
                       double(a.param_bytes()) / (1 << 20));
  };
  for (size_t g = 0; g < b.groups.size(); ++g) {
    int64_t bytes = 0;
    std::vector<std::string> lines;
    for (int e : b.groups[g].experts)
      lines.push_back(fmt::format("  expert {:<18} {}\n", b.experts[size_t(e)].name, describe(b.experts[size_t(e)], &bytes)));
    std::cout << fmt::format("group {:<14} {} experts, {:.2f} MiB\n", b.groups[g].name, b.groups[g].experts.size(),
                             double(bytes) / (1 << 20));
    for (const auto& l : lines) std::cout << l;
  }
  if (b.general) {
    int64_t bytes = 0;
    std::cout << fmt::format("general expert {:<11} {}\n", b.general->name, describe(*b.general, &bytes));
  }
  return 0;
}

}  // namespace atmoe::app
