// atmoe generate: prints only the generated text on stdout (streamed for one prompt);
// logs go to stderr. No chat template unless --chat.
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "apps/commands.h"
#include "apps/launch.h"
#include "apps/routing_flags.h"
#include "common/chat_template.h"
#include "common/error.h"
#include "common/files.h"
#include "common/log.h"
#include "coordinator/engine.h"
#include "coordinator/trace.h"
#include "coordinator/trex_pool.h"

namespace atmoe::app {

namespace {
struct GenerateOpts {
  std::string model, bundle, trace, dtype, system, seed, placement, device;
  RoutingFlags rf;
  std::vector<std::string> prompts, prompt_files, stop;
  bool chat = false, ignore_eos = false, check_tensors = false;
  int max_tokens = 128, top_k = 40;
  double temperature = 0.8, top_p = 0.95;
};

// stdout must take every byte: a full disk or a closed pipe is an error, not exit 0.
void write_stdout(const std::string& s) {
  if (s.empty()) return;
  if (std::fwrite(s.data(), 1, s.size(), stdout) != s.size() || std::fflush(stdout) != 0)
    throw RuntimeError(fmt::format("writing the output to stdout failed: {}", std::strerror(errno)));
}

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
  add_placement_flag(app, o->placement);
  app.add_option("--prompt", o->prompts, "Prompt text (repeatable: a batch of prompts)");
  app.add_option("--prompt-file", o->prompt_files, "A file whose whole content is one prompt (repeatable; after the --prompt texts)");
  app.add_flag("--chat", o->chat, "Wrap the prompt in the model's chat template");
  app.add_option("--system", o->system, "System message (with --chat)");
  app.add_option("--max-tokens", o->max_tokens, "Maximum tokens to generate (0..1048576)");
  app.add_option("--temperature", o->temperature, "Sampling temperature; 0 = greedy");
  app.add_option("--top-k", o->top_k, "Keep the k most likely tokens (0 = all)");
  app.add_option("--top-p", o->top_p, "Nucleus sampling mass");
  app.add_option("--seed", o->seed, "Random seed, 0..18446744073709551615 (default: random)");
  app.add_flag("--check-tensors", o->check_tensors, "Check every base-model weight for NaN/Inf at load (as llama.cpp's --check-tensors)");
  app.add_option("--stop", o->stop, "Stop string (repeatable)");
  app.add_flag("--ignore-eos", o->ignore_eos, "Do not stop at end-of-generation tokens");
  app.add_option("--dtype", o->dtype, "Weight/compute precision: bf16 (default) or f32 (exact)");
  add_device_flag(app, o->device);
  return [o]() -> int {
    ATMOE_CHECK_INPUT(std::isfinite(o->temperature) && o->temperature >= 0 && o->temperature <= 1e4,
                      "--temperature {}: must be in [0, 1e4]", o->temperature);
    ATMOE_CHECK_INPUT(std::isfinite(o->top_p) && o->top_p > 0 && o->top_p <= 1, "--top-p {}: must be in (0, 1]", o->top_p);
    ATMOE_CHECK_INPUT(o->top_k >= 0, "--top-k {}: must be >= 0", o->top_k);
    ATMOE_CHECK_INPUT(o->max_tokens >= 0 && o->max_tokens <= (1 << 20), "--max-tokens {}: must be in 0..1048576", o->max_tokens);
    ATMOE_CHECK_INPUT(o->chat || o->system.empty(), "--system applies to the chat template: give --chat too");
    const uint64_t seed = o->seed.empty() ? uint64_t(std::random_device{}()) << 32 | std::random_device{}()
                                          : parse_u64_flag("--seed", o->seed);
    ATMOE_CHECK_INPUT(!o->model.empty() || !o->bundle.empty(), "generate: give --model PATH or --bundle DIR");
    ATMOE_CHECK_INPUT(!o->bundle.empty() || o->trace.empty(), "--trace needs --bundle");
    ATMOE_CHECK_INPUT(!o->bundle.empty() || o->placement.empty(), "--placement needs --bundle");
    RoutingControls controls = to_controls(o->rf);
    if (o->bundle.empty()) refuse_routing_without_bundle(controls);
    // Outputs are checked before any work.
    if (!o->trace.empty()) require_writable_file(o->trace, "--trace");
    std::vector<std::string> prompts = o->prompts;
    for (const auto& pf : o->prompt_files) prompts.push_back(read_file(pf, "--prompt-file", kMaxPromptFileBytes));
    ATMOE_CHECK_INPUT(!prompts.empty(), "generate: give --prompt TEXT or --prompt-file F");
    std::unique_ptr<Bundle> bundle;
    if (!o->bundle.empty()) bundle = std::make_unique<Bundle>(load_bundle_manifest(o->bundle));
    if (bundle && bundle->method == "at-moe") (void)resolve_routing(*bundle, controls);  // before any weights load
    std::unique_ptr<Backend> device = device_backend(o->device);
    auto model = Model::load(o->model.empty() ? bundle->base_model : o->model, parse_dtype_flag(o->dtype),
                             o->check_tensors, device.get());
    BundleExperts bx;
    if (bundle) {
      bx = attach_experts(*bundle, *model, o->placement);
      (void)bx.dispatch()->new_routing(controls);  // a bad control fails before any work
    }
    ExpertPool* const experts = bx.atmoe.get();
    TrexPool* const trex = bx.trex.get();
    std::vector<GenerateRequest> reqs;
    for (size_t i = 0; i < prompts.size(); ++i) {
      GenerateRequest r;
      check_prompt_bytes(*model, prompts[i], i);
      r.prompt = encode_prompt(*model, prompts[i], o->chat, o->system);
      ATMOE_CHECK_INPUT(!r.prompt.empty(), "prompt {} is empty after tokenization", i);
      r.sampling = {float(o->temperature), o->top_k, float(o->top_p)};
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
      res = eng.run(reqs, [](size_t, const std::string& s) { write_stdout(s); });
      write_stdout("\n");
    } else {
      res = eng.run(reqs);
      for (size_t i = 0; i < res.size(); ++i) write_stdout(res[i].text + "\n" + (i + 1 < res.size() ? "\n" : ""));
    }
    if (!o->trace.empty()) {
      nlohmann::json t = nlohmann::json::array();
      for (size_t i = 0; i < res.size(); ++i) {
        std::vector<int32_t> fed = reqs[i].prompt;
        fed.insert(fed.end(), res[i].tokens.begin(), res[i].tokens.end());
        nlohmann::json one = experts ? routing_trace(experts->bundle(), *res[i].routing, fed) : trex_trace(*trex, *res[i].routing);
        one["request"] = i;
        t.push_back(std::move(one));
      }
      write_file(o->trace, (t.size() == 1 ? t[0] : t).dump(1) + "\n", "--trace");
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
