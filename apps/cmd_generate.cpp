// atmoe generate: prints only the generated text on stdout (streamed for one prompt);
// logs go to stderr. No chat template unless --chat.
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include "apps/commands.h"
#include "common/chat_template.h"
#include "common/error.h"
#include "coordinator/engine.h"

namespace atmoe::app {

namespace {
struct GenerateOpts {
  std::string model, prompt_file, dtype, system;
  std::vector<std::string> prompts, stop;
  bool chat = false, ignore_eos = false;
  int max_tokens = 128, top_k = 40;
  float temperature = 0.8f, top_p = 0.95f;
  int64_t seed = -1;
};

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
}  // namespace

Runner add_generate(CLI::App& app) {
  auto o = std::make_shared<GenerateOpts>();
  app.add_option("--model", o->model, "Model: a .gguf file or an HF directory")->required();
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
    auto model = Model::load(o->model, parse_dtype_flag(o->dtype));
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
      reqs.push_back(std::move(r));
    }
    Engine eng(*model);
    if (reqs.size() == 1) {
      eng.run(reqs, [](size_t, const std::string& s) {
        std::cout << s << std::flush;
      });
      std::cout << "\n";
    } else {
      auto res = eng.run(reqs);
      for (size_t i = 0; i < res.size(); ++i) std::cout << res[i].text << "\n" << (i + 1 < res.size() ? "\n" : "");
    }
    return 0;
  };
}

}  // namespace atmoe::app
