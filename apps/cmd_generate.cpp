// atmoe generate: prints only the generated text on stdout (streamed for one prompt);
// logs go to stderr. No chat template unless --chat.
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include "apps/commands.h"
#include "apps/routing_flags.h"
#include "common/chat_template.h"
#include "common/error.h"
#include "common/log.h"
#include "coordinator/engine.h"
#include "coordinator/trace.h"
#include "coordinator/trex_pool.h"

namespace atmoe::app {

namespace {
struct GenerateOpts {
  std::string model, bundle, trace, prompt_file, dtype, system;
  RoutingFlags rf;
  std::vector<std::string> prompts, stop;
  bool chat = false, ignore_eos = false;
  int max_tokens = 128, top_k = 40;
  float temperature = 0.8f, top_p = 0.95f;
  int64_t seed = -1;
};

}  // namespace

std::vector<int32_t> encode_prompt(const Model& m, const std::string& text, bool chat, const std::string& system) {
  const Tokenizer& tok = m.tokenizer();
  if (!chat) return tok.encode(text, tok.add_bos_default(), /*parse_special=*/true);
  ChatFormat f = detect_chat_format(tok.chat_template(), m.info().path);
  std::vector<ChatMessage> msgs;
  if (!system.empty()) msgs.push_back({"system", system});
  msgs.push_back({"user", text});
  std::string bos_text = tok.bos_id() >= 0 ? tok.token_text(tok.bos_id()) : std::string();
  std::string rendered = render_chat(f, msgs, chat_default_system(tok.chat_template()), f == ChatFormat::Llama3 && tok.add_bos_default(), bos_text);
  return tok.encode(rendered, /*add_bos=*/f == ChatFormat::ChatML && tok.add_bos_default(), true);
}

Runner add_generate(CLI::App& app) {
  auto o = std::make_shared<GenerateOpts>();
  app.add_option("--model", o->model, "Model: a .gguf file or an HF directory (overrides a bundle's base_model)");
  app.add_option("--bundle", o->bundle, "Expert bundle directory (atmoe.json)");
  app.add_option("--trace", o->trace, "Write the routing weights per layer as JSON to this file");
  add_routing_flags(app, o->rf);
  app.add_option("--prompt", o->prompts, "Prompt text (repeat for a batch of prompts)");
  app.add_option("--prompt-file", o->prompt_file, "Read one prompt from a file");
  app.add_flag("--chat", o->chat, "Wrap the prompt in the model's chat template");
  app.add_option("--system", o->system, "System message (with --chat)");
  app.add_option("--max-tokens", o->max_tokens, "Maximum tokens to generate")->check(CLI::NonNegativeNumber);
  app.add_option("--temperature", o->temperature, "Sampling temperature; 0 = greedy");
  app.add_option("--top-k", o->top_k, "Keep the k most likely tokens (0 = all)");
  app.add_option("--top-p", o->top_p, "Nucleus sampling mass");
  app.add_option("--seed", o->seed, "Random seed (default: random)");
  app.add_option("--stop", o->stop, "Stop string (repeatable)");
  app.add_flag("--ignore-eos", o->ignore_eos, "Do not stop at end-of-generation tokens");
  app.add_option("--dtype", o->dtype, "Weight/compute precision: bf16 (default) or f32 (exact)");
  return [o]() -> int {
    ATMOE_CHECK_INPUT(o->temperature >= 0, "--temperature {}: must be >= 0", o->temperature);
    ATMOE_CHECK_INPUT(o->top_p > 0 && o->top_p <= 1, "--top-p {}: must be in (0, 1]", o->top_p);
    ATMOE_CHECK_INPUT(o->top_k >= 0, "--top-k {}: must be >= 0", o->top_k);
    std::vector<std::string> prompts = o->prompts;
    if (!o->prompt_file.empty()) {
      std::ifstream f(o->prompt_file, std::ios::binary);
      ATMOE_CHECK_INPUT(bool(f), "{}: cannot open prompt file", o->prompt_file);
      std::stringstream ss;
      ss << f.rdbuf();
      prompts.push_back(ss.str());
    }
    ATMOE_CHECK_INPUT(!prompts.empty(), "generate: give --prompt TEXT or --prompt-file F");
    ATMOE_CHECK_INPUT(!o->model.empty() || !o->bundle.empty(), "generate: give --model PATH or --bundle DIR");
    std::unique_ptr<Bundle> bundle;
    if (!o->bundle.empty()) bundle = std::make_unique<Bundle>(load_bundle_manifest(o->bundle));
    ATMOE_CHECK_INPUT(bundle || o->trace.empty(), "--trace needs --bundle");
    auto model = Model::load(o->model.empty() ? bundle->base_model : o->model, parse_dtype_flag(o->dtype));
    std::unique_ptr<ExpertPool> experts;
    std::unique_ptr<TrexPool> trex;
    RoutingControls controls = to_controls(o->rf);
    if (bundle && bundle->method == "t-rex") {
      trex = std::make_unique<TrexPool>(*bundle, model->config(), model->dtype());
      (void)trex->new_routing(controls);  // a bad control fails before any work
      model->set_trex(trex.get());
    } else if (bundle) {
      experts = std::make_unique<ExpertPool>(*bundle, model->config(), model->dtype());
      (void)resolve_routing(experts->bundle(), controls);
      model->set_experts(experts.get());
    }
    uint64_t seed = o->seed >= 0 ? uint64_t(o->seed) : std::random_device{}();
    std::vector<GenerateRequest> reqs;
    for (size_t i = 0; i < prompts.size(); ++i) {
      GenerateRequest r;
      r.prompt = encode_prompt(*model, prompts[i], o->chat, o->system);
      ATMOE_CHECK_INPUT(!r.prompt.empty(), "prompt {} is empty after tokenization", i);
      r.sampling = {o->temperature, o->top_k, o->top_p};
      r.seed = seed + i;
      r.max_tokens = o->max_tokens;
      r.stop = o->stop;
      r.ignore_eos = o->ignore_eos;
      r.routing = controls;
      r.trace_tokens = !o->trace.empty();
      reqs.push_back(std::move(r));
    }
    Engine eng(*model);
    std::vector<GenerateResult> res;
    if (reqs.size() == 1) {
      res = eng.run(reqs, [](size_t, const std::string& s) { std::cout << s << std::flush; });
      std::cout << "\n";
    } else {
      res = eng.run(reqs);
      for (size_t i = 0; i < res.size(); ++i) std::cout << res[i].text << "\n" << (i + 1 < res.size() ? "\n" : "");
    }
    if (!o->trace.empty()) {
      nlohmann::json t = nlohmann::json::array();
      for (const auto& r : res)
        t.push_back(experts ? routing_trace(experts->bundle(), *r.routing) : trex_trace(*trex, *r.routing));
      std::ofstream f(o->trace);
      ATMOE_CHECK_INPUT(bool(f), "{}: cannot write the trace", o->trace);
      f << (t.size() == 1 ? t[0] : t).dump(1) << "\n";
    }
    if (experts && !experts->bundle().groups.empty() && ATMOE_LOG("coord")->should_log(spdlog::level::info))
      for (size_t i = 0; i < res.size(); ++i) {
        auto hg = heaviest_groups(experts->bundle(), *res[i].routing);
        ATMOE_LOG("coord")->info("request {}: heaviest groups {} ({:.2f}){}", i, hg[0].first, hg[0].second,
                                 hg.size() > 1 ? fmt::format(", {} ({:.2f})", hg[1].first, hg[1].second) : "");
      }
    return 0;
  };
}

}  // namespace atmoe::app
