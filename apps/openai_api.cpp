#include "apps/openai_api.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>

#include "apps/commands.h"
#include "common/chat_template.h"
#include "common/utf8.h"
#include "coordinator/experts.h"
#include "coordinator/trace.h"
#include "coordinator/trex_pool.h"

namespace atmoe::app {

using json = nlohmann::json;

namespace {

std::string type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::number_float: return "a number";
    default: return "an integer";
  }
}

[[noreturn]] void bad(const std::string& field, const std::string& what, const json& v) {
  throw InputError(fmt::format("body.{}: {}, got {}", field, what, type_name(v)));
}

double get_number(const json& v, const std::string& f, double lo, double hi) {
  if (!v.is_number()) bad(f, fmt::format("must be a number in [{}, {}]", lo, hi), v);
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || x > hi)
    throw InputError(fmt::format("body.{}: {} is out of range [{}, {}]", f, x, lo, hi));
  return x;
}

int64_t get_int(const json& v, const std::string& f, int64_t lo, int64_t hi) {
  if (!v.is_number_integer() && !(v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()))
    bad(f, fmt::format("must be an integer in [{}, {}]", lo, hi), v);
  const double d = v.get<double>();
  // Exact for integers (an unsigned above INT64_MAX must not wrap); floats below 2^63.
  const bool in_range = v.is_number_unsigned()   ? v.get<uint64_t>() <= uint64_t(hi) && (lo <= 0 || v.get<uint64_t>() >= uint64_t(lo))
                        : v.is_number_integer() ? v.get<int64_t>() >= lo && v.get<int64_t>() <= hi
                                                : d >= double(lo) && d <= double(hi) && d < 9223372036854775808.0;
  if (!in_range) throw InputError(fmt::format("body.{}: {} is out of range [{}, {}]", f, v.dump(), lo, hi));
  return v.is_number_unsigned() ? int64_t(v.get<uint64_t>()) : v.is_number_integer() ? v.get<int64_t>() : int64_t(d);
}

std::string get_string(const json& v, const std::string& f) {
  if (!v.is_string()) bad(f, "must be a string", v);
  std::string s = v.get<std::string>();
  if (utf8_sanitize(s) != s) throw InputError(fmt::format("body.{}: not valid UTF-8", f));
  return s;
}

bool present(const json& body, const char* k) { return body.contains(k) && !body[k].is_null(); }

// Routing controls from the "routing" extension object.
RoutingControls parse_routing(const json& r) {
  if (!r.is_object()) bad("routing", "must be an object of routing controls", r);
  RoutingControls c;
  for (const auto& [k, v] : r.items()) {
    const std::string f = "routing." + k;
    if (k == "off") {
      if (!v.is_boolean()) bad(f, "must be true or false", v);
      c.off = v.get<bool>();
    } else if (k == "adapter") {
      c.adapter = get_string(v, f);
    } else if (k == "pin" || k == "group_bias") {
      if (!v.is_object()) bad(f, "must be an object {group: number}", v);
      auto& m = k == "pin" ? c.pin : c.group_bias;
      for (const auto& [g, w] : v.items()) m[g] = get_number(w, f + "." + g, -1e6, 1e6);
    } else if (k == "mask") {
      if (!v.is_array()) bad(f, "must be an array of expert or group names", v);
      for (const auto& x : v) c.mask.push_back(get_string(x, f + "[]"));
    } else if (k == "top_k_groups") {
      c.top_k_groups = int(get_int(v, f, 0, 1 << 20));
    } else if (k == "tau_group") {
      c.tau_group = get_number(v, f, 0, 1e6);
    } else if (k == "tau_expert") {
      c.tau_expert = get_number(v, f, 0, 1e6);
    } else if (k == "lambda") {
      c.lambda = get_number(v, f, 0, 1);
    } else if (k == "intuition_embedding") {
      if (!v.is_array()) bad(f, "must be an array of numbers", v);
      for (const auto& x : v) c.intuition_embedding.push_back(float(get_number(x, f + "[]", -1e30, 1e30)));
    } else if (k == "intuition") {
      const std::string s = get_string(v, f);
      if (s != "on" && s != "off") throw InputError(fmt::format("body.{}: \"{}\": must be \"on\" or \"off\"", f, s));
      c.intuition_off = s == "off";
    } else if (k == "pin_cluster") {
      c.pin_cluster = int(get_int(v, f, 0, 1 << 20));
    } else if (k == "omega") {
      c.omega = get_number(v, f, 0, 1);
    } else {
      throw InputError(fmt::format(
          "body.routing.{}: unknown routing control (off, adapter, pin, mask, group_bias, top_k_groups, tau_group, "
          "tau_expert, lambda, intuition_embedding, intuition, pin_cluster, omega)",
          k));
    }
  }
  return c;
}

}  // namespace

std::vector<ChatMessage> parse_messages(const json& v) {
  if (!v.is_array() || v.empty()) bad("messages", "must be a non-empty array of {role, content}", v);
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < v.size(); ++i) {
    const json& m = v[i];
    const std::string f = fmt::format("messages[{}]", i);
    if (!m.is_object()) bad(f, "must be an object {role, content}", m);
    if (!m.contains("role")) throw InputError(fmt::format("body.{}.role: missing", f));
    const std::string role = get_string(m["role"], f + ".role");
    if (role != "system" && role != "user" && role != "assistant" && role != "developer")
      throw InputError(fmt::format("body.{}.role: \"{}\": must be system, developer, user or assistant", f, role));
    if (!m.contains("content")) throw InputError(fmt::format("body.{}.content: missing", f));
    const json& c = m["content"];
    std::string text;
    if (c.is_string()) {
      text = get_string(c, f + ".content");
    } else if (c.is_array()) {  // [{"type": "text", "text": ...}]
      for (size_t j = 0; j < c.size(); ++j) {
        const std::string pf = fmt::format("{}.content[{}]", f, j);
        if (!c[j].is_object() || !c[j].contains("type") || c[j]["type"] != "text" || !c[j].contains("text"))
          throw InputError(fmt::format("body.{}: only {{\"type\": \"text\", \"text\": ...}} parts are supported", pf));
        text += get_string(c[j]["text"], pf + ".text");
      }
    } else {
      bad(f + ".content", "must be a string or an array of text parts", c);
    }
    out.push_back({role == "developer" ? "system" : role, std::move(text)});
  }
  return out;
}

// A text of more bytes than the context times the longest token can never fit: refused
// before tokenizing it.
static void check_text_bytes(const Model& m, const std::string& text, const std::string& field) {
  if (text.size() > prompt_bytes_cap(m))
    throw InputError(fmt::format("body.{}: {} bytes can never fit the context of {} tokens", field, text.size(),
                                 m.config().max_position));
}

std::vector<int32_t> chat_tokens(const Model& m, const std::vector<ChatMessage>& msgs) {
  const Tokenizer& tok = m.tokenizer();
  const ChatFormat f = detect_chat_format(tok.chat_template(), m.info().path);
  const std::string bos_text = tok.bos_id() >= 0 ? tok.token_text(tok.bos_id()) : std::string();
  const std::string rendered = render_chat(f, msgs, chat_default_system(tok.chat_template()),
                                           f == ChatFormat::Llama3 && tok.add_bos_default(), bos_text);
  // Role text is the client's: its special-token strings are parsed as in the template
  // (as llama.cpp's server does); the size bound is checked before tokenizing.
  check_text_bytes(m, rendered, "messages");
  return tok.encode(rendered, f == ChatFormat::ChatML && tok.add_bos_default(), true);
}

namespace {

std::vector<int32_t> completion_tokens(const Model& m, const json& p) {
  const Tokenizer& tok = m.tokenizer();
  const int64_t V = m.config().vocab;
  auto from_ids = [&](const json& a, const std::string& f) {
    std::vector<int32_t> t;
    for (size_t i = 0; i < a.size(); ++i) t.push_back(int32_t(get_int(a[i], fmt::format("{}[{}]", f, i), 0, V - 1)));
    return t;
  };
  auto from_text = [&](const json& s, const std::string& f) {
    const std::string text = get_string(s, f);
    check_text_bytes(m, text, f);
    // Special-token text in a prompt is the special token, as in `generate` and in vLLM
    // (HF tokenizers split added tokens out of the text).
    return tok.encode(text, tok.add_bos_default(), /*parse_special=*/true);
  };
  if (p.is_string()) return from_text(p, "prompt");
  if (p.is_array() && !p.empty()) {
    if (p[0].is_number()) return from_ids(p, "prompt");
    if (p.size() == 1 && p[0].is_string()) return from_text(p[0], "prompt[0]");
    if (p.size() == 1 && p[0].is_array()) return from_ids(p[0], "prompt[0]");
    throw InputError(
        fmt::format("body.prompt: a list of {} prompts: send one request per prompt (n and batched prompts are not "
                    "supported)",
                    p.size()));
  }
  bad("prompt", "must be a string, an array of token ids, or a one-element array of either", p);
}

}  // namespace

Endpoint parse_endpoint(const std::string& url) {
  if (url == "/v1/completions") return Endpoint::Completions;
  if (url == "/v1/chat/completions") return Endpoint::ChatCompletions;
  throw InputError(fmt::format("url \"{}\": must be /v1/chat/completions or /v1/completions", url));
}

ServedModels served_models(const Model& m, const Bundle* b) {
  namespace fs = std::filesystem;
  ServedModels s;
  s.bundle = b;
  fs::path base(m.info().path);
  s.base_id = base.extension() == ".gguf" ? base.stem().string() : base.filename().string();
  if (s.base_id.empty()) s.base_id = fs::path(m.info().path).parent_path().filename().string();
  if (b) {
    s.bundle_id = fs::path(b->dir).lexically_normal().filename().string();
    if (s.bundle_id.empty()) s.bundle_id = fs::path(b->dir).lexically_normal().parent_path().filename().string();
  }
  return s;
}

OpenAiRequest parse_openai_request(const json& body, Endpoint ep, const Model& m, const ServedModels& sm,
                                   uint64_t seed_default) {
  if (!body.is_object()) throw InputError(fmt::format("body: must be a JSON object, got {}", type_name(body)));
  OpenAiRequest r;
  r.endpoint = ep;
  GenerateRequest& g = r.gen;
  // Model: the bundle, the base alone, or one expert alone.
  bool runtime_adapter = false;
  if (!present(body, "model")) throw InputError("body.model: missing");
  r.model = get_string(body["model"], "model");
  if (!sm.bundle_id.empty() && r.model == sm.bundle_id) {
    g.use_experts = true;
  } else if (r.model == sm.base_id) {
    g.use_experts = false;
  } else if (sm.bundle && sm.bundle->expert_index(r.model) >= 0) {
    g.routing.adapter = r.model;
  } else if (const auto* pool = dynamic_cast<const ExpertPool*>(m.experts()); pool && pool->has_adapter(r.model)) {
    g.routing.adapter = r.model;  // a run-time adapter (the server's load_lora_adapter)
    runtime_adapter = true;
  } else {
    std::string known = sm.bundle_id.empty()
                            ? sm.base_id
                            : sm.bundle_id + " (the routed bundle), " + sm.base_id + " (the base alone) or an expert's name";
    throw NotFoundError(fmt::format("body.model: \"{}\" is not served here (models: {})", r.model, known));
  }
  // Output-changing fields of OpenAI's and vLLM's APIs that atmoe does not implement:
  // refused naming the field unless they hold their neutral value; never ignored. Other
  // unknown fields (user, metadata, ...) are ignored, as vLLM does.
  for (const auto& [k, v] : body.items()) {
    if (v.is_null()) continue;
    const bool empty = (v.is_object() || v.is_array() || v.is_string()) && v.empty();
    const bool f = v.is_boolean() && !v.get<bool>(), t = v.is_boolean() && v.get<bool>();
    auto num_is = [&](double x) { return v.is_number() && v.get<double>() == x; };
    bool refused = false;
    if (k == "tools" || k == "functions" || k == "stop_token_ids" || k == "bad_words" ||
        k == "allowed_token_ids" || k == "chat_template" || k == "chat_template_kwargs" || k == "guided_json" ||
        k == "guided_regex" || k == "guided_choice" || k == "guided_grammar" || k == "structured_outputs" ||
        k == "suffix" || k == "logits_processors" || k == "documents" || k == "audio" || k == "grammar" ||
        k == "json_schema" || k == "prediction")
      refused = !empty;
    else if (k == "modalities")
      refused = !(v.is_array() && (v.empty() || (v.size() == 1 && v[0] == "text")));
    // llama.cpp's and TGI's own names: refused with a hint rather than ignored.
    else if (k == "n_predict" || k == "max_new_tokens" || k == "repeat_penalty" || k == "do_sample" ||
             k == "n_probs" || k == "samplers")
      refused = true;
    else if (k == "typical_p" || k == "tfs_z" || k == "tfs")
      refused = !num_is(1);
    else if (k == "mirostat" || k == "dynatemp_range" || k == "xtc_probability" || k == "dry_multiplier")
      refused = !num_is(0);
    else if (k == "return_tokens_as_token_ids" || k == "echo" || k == "use_beam_search" || k == "include_stop_str_in_output" ||
             k == "continue_final_message")
      refused = !f;
    else if (k == "prompt_logprobs" || k == "min_tokens" || k == "truncate_prompt_tokens")
      refused = !num_is(0);
    else if (k == "best_of" || k == "length_penalty")
      refused = !num_is(1);
    else if (k == "skip_special_tokens" || k == "add_generation_prompt" || k == "spaces_between_special_tokens" ||
             k == "add_special_tokens")
      refused = !t;
    else if (k == "tool_choice" || k == "function_call")
      refused = !(v.is_string() && (v == "none" || v == "auto"));
    else if (k == "response_format")
      refused = !(v.is_object() && v.contains("type") && v["type"] == "text");
    if (refused)
      throw InputError(fmt::format("body.{}: not supported by atmoe{}", k,
                                   k == "n_predict" || k == "max_new_tokens" ? " (use max_tokens)"
                                   : k == "repeat_penalty"                   ? " (use repetition_penalty)"
                                   : k == "do_sample"                        ? " (temperature 0 is greedy)"
                                   : k == "n_probs"                          ? " (use logprobs)"
                                                                             : ""));
  }
  if (present(body, "n")) r.n = int(get_int(body["n"], "n", 1, kMaxChoices));
  if (present(body, "stream")) {
    if (!body["stream"].is_boolean()) bad("stream", "must be true or false", body["stream"]);
    r.stream = body["stream"].get<bool>();
  }
  if (present(body, "stream_options")) {
    const json& so = body["stream_options"];
    if (!r.stream) throw InputError("body.stream_options: only allowed with \"stream\": true");
    if (!so.is_object()) bad("stream_options", "must be an object", so);
    for (const auto& [k, v] : so.items()) {
      if (k == "include_usage") {
        if (!v.is_boolean()) bad("stream_options.include_usage", "must be true or false", v);
        r.include_usage = v.get<bool>();
      } else if (k != "continuous_usage_stats" || (v.is_boolean() && v.get<bool>())) {
        throw InputError(fmt::format("body.stream_options.{}: not supported by atmoe (include_usage only)", k));
      }
    }
  }
  // Prompt.
  if (ep == Endpoint::ChatCompletions) {
    if (!present(body, "messages")) throw InputError("body.messages: missing");
    g.prompt = chat_tokens(m, parse_messages(body["messages"]));
  } else {
    if (!present(body, "prompt")) throw InputError("body.prompt: missing");
    g.prompt = completion_tokens(m, body["prompt"]);
  }
  if (g.prompt.empty()) throw InputError("body.prompt: empty after tokenization");
  const int64_t ctx = m.config().max_position, left = ctx - int64_t(g.prompt.size());
  if (left < 1)
    throw InputError(fmt::format("body.{}: {} tokens leave no room in the context length {}",
                                 ep == Endpoint::ChatCompletions ? "messages" : "prompt", g.prompt.size(), ctx));
  // Length: OpenAI's completions default 16. Chat: vLLM's default is the rest of the
  // context; atmoe reserves a request's KV cache whole at admission, so its default is
  // capped at kChatDefaultMaxTokens (docs/batch.md).
  const char* mt = present(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  if (present(body, mt)) {
    g.max_tokens = int(get_int(body[mt], mt, 1, 1 << 20));
    if (g.max_tokens > left)
      throw InputError(fmt::format("body.{}: {} + the prompt's {} tokens exceed the context length {}", mt,
                                   g.max_tokens, g.prompt.size(), ctx));
  } else {
    g.max_tokens = int(std::min<int64_t>(ep == Endpoint::Completions ? 16 : kChatDefaultMaxTokens, left));
  }
  // Sampling: OpenAI's defaults (temperature 1, top_p 1); top_k as vLLM (-1 or 0 = off).
  g.sampling.temperature = present(body, "temperature") ? float(get_number(body["temperature"], "temperature", 0, 2)) : 1.f;
  g.sampling.top_p = present(body, "top_p") ? float(get_number(body["top_p"], "top_p", 0, 1)) : 1.f;
  if (g.sampling.top_p <= 0) throw InputError("body.top_p: 0 is out of range (0, 1]");
  g.sampling.top_k = present(body, "top_k") ? int(std::max<int64_t>(0, get_int(body["top_k"], "top_k", -1, 1 << 30))) : 0;
  g.seed = present(body, "seed") ? uint64_t(get_int(body["seed"], "seed", std::numeric_limits<int64_t>::min(),
                                                    std::numeric_limits<int64_t>::max()))
                                 : seed_default;
  if (present(body, "min_p")) g.sampling.min_p = float(get_number(body["min_p"], "min_p", 0, 1));
  if (present(body, "presence_penalty"))
    g.penalties.presence = float(get_number(body["presence_penalty"], "presence_penalty", -2, 2));
  if (present(body, "frequency_penalty"))
    g.penalties.frequency = float(get_number(body["frequency_penalty"], "frequency_penalty", -2, 2));
  if (present(body, "repetition_penalty")) {
    g.penalties.repetition = float(get_number(body["repetition_penalty"], "repetition_penalty", 0, 100));
    if (g.penalties.repetition <= 0) throw InputError("body.repetition_penalty: 0 is out of range (0, 100]");
  }
  if (present(body, "logit_bias")) {
    const json& lb = body["logit_bias"];
    if (!lb.is_object()) bad("logit_bias", "must be an object {\"token id\": bias}", lb);
    const int64_t V = m.config().vocab;
    for (const auto& [k, v] : lb.items()) {
      const std::string f = "logit_bias." + k;
      char* end = nullptr;
      errno = 0;
      const long long id = k.empty() || !std::isdigit(static_cast<unsigned char>(k[0])) ? -1 : std::strtoll(k.c_str(), &end, 10);
      if (id < 0 || errno || !end || *end || id >= V)
        throw InputError(fmt::format("body.{}: not a token id in [0, {})", f, V));
      g.logit_bias.emplace_back(int32_t(id), float(get_number(v, f, -100, 100)));
    }
  }
  // Log-probabilities: chat: logprobs true (+ top_logprobs n); completions: logprobs n.
  if (ep == Endpoint::ChatCompletions) {
    bool want = false;
    if (present(body, "logprobs")) {
      if (!body["logprobs"].is_boolean()) bad("logprobs", "must be true or false", body["logprobs"]);
      want = body["logprobs"].get<bool>();
    }
    const int top = present(body, "top_logprobs") ? int(get_int(body["top_logprobs"], "top_logprobs", 0, 20)) : 0;
    if (top > 0 && !want) throw InputError("body.top_logprobs: needs \"logprobs\": true");
    g.logprobs = want ? top : -1;
  } else if (present(body, "logprobs")) {
    g.logprobs = int(get_int(body["logprobs"], "logprobs", 0, 20));
  }
  if (present(body, "stop")) {
    const json& s = body["stop"];
    if (s.is_string()) {
      g.stop.push_back(get_string(s, "stop"));
    } else if (s.is_array()) {
      for (size_t i = 0; i < s.size(); ++i) g.stop.push_back(get_string(s[i], fmt::format("stop[{}]", i)));
    } else {
      bad("stop", "must be a string or an array of strings", s);
    }
  }
  if (present(body, "ignore_eos")) {
    if (!body["ignore_eos"].is_boolean()) bad("ignore_eos", "must be true or false", body["ignore_eos"]);
    g.ignore_eos = body["ignore_eos"].get<bool>();
  }
  // atmoe's extension fields.
  if (present(body, "routing")) {
    RoutingControls c = parse_routing(body["routing"]);
    if (!g.routing.adapter.empty() && (!c.atmoe_set().empty() || !c.trex_set().empty() || c.off))
      throw InputError(fmt::format("body.routing: model \"{}\" is one expert alone: no routing controls apply",
                                   r.model));
    if (!g.use_experts && (!c.atmoe_set().empty() || !c.trex_set().empty()))
      throw InputError(fmt::format("body.routing: model \"{}\" is the base alone: no routing controls apply", r.model));
    if (g.routing.adapter.empty()) g.routing = std::move(c);
  }
  if (present(body, "routing_trace")) {
    if (!body["routing_trace"].is_boolean()) bad("routing_trace", "must be true or false", body["routing_trace"]);
    r.routing_trace = body["routing_trace"].get<bool>();
  }
  if ((r.routing_trace || !g.routing.atmoe_set().empty() || !g.routing.trex_set().empty()) && !m.experts())
    throw InputError("body.routing: this server has no expert bundle");
  if (r.routing_trace && runtime_adapter)
    throw InputError(fmt::format("body.routing_trace: model \"{}\" is a run-time adapter: it is not routed", r.model));
  if (r.routing_trace && !g.use_experts)
    throw InputError(fmt::format("body.routing_trace: model \"{}\" is the base alone: there is no routing to trace",
                                 r.model));
  g.trace_tokens = r.routing_trace;
  // A control the bundle refuses fails here, alone (the scheduler's submit checks it too).
  if (g.use_experts && m.experts()) (void)m.experts()->new_routing(g.routing);
  return r;
}

namespace {

json usage_json(const std::vector<GenerateResult>& gs) {
  int64_t completion = 0;
  for (const auto& g : gs) completion += int64_t(g.tokens.size());
  const int64_t prompt = gs.empty() ? 0 : gs[0].prompt_tokens;
  return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}

json atmoe_ext(const OpenAiRequest& r, const GenerateResult& g, const ServedModels& sm) {
  json ext = {{"finish_reason", g.finish_reason}};
  if (g.routing && g.routing->adapter_slot < 0 && sm.bundle && sm.bundle->method == "at-moe" && r.gen.use_experts) {
    json groups = json::object();
    for (const auto& [name, w] : heaviest_groups(*sm.bundle, *g.routing)) groups[name] = w;
    ext["routing"] = groups;
  }
  return ext;
}

json chunk_head(const OpenAiRequest& r, const std::string& id, int64_t created) {
  return {{"id", id},
          {"object", r.endpoint == Endpoint::ChatCompletions ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", r.model}};
}

std::string finish_name(const GenerateResult& g) { return g.finish_reason == "cancelled" ? "abort" : g.finish_reason; }

// The full routing trace of a result (routing_trace: true), or null.
json trace_json(const OpenAiRequest& r, const GenerateResult& g, const Model& m, const ServedModels& sm) {
  if (!r.routing_trace || !g.routing) return nullptr;
  std::vector<int32_t> fed = r.gen.prompt;
  fed.insert(fed.end(), g.tokens.begin(), g.tokens.end());
  if (const auto* t = dynamic_cast<const TrexPool*>(m.experts())) return trex_trace(*t, *g.routing);
  if (sm.bundle) return routing_trace(*sm.bundle, *g.routing, fed);
  return nullptr;
}

json bytes_json(const std::string& b) {
  json a = json::array();
  for (unsigned char c : b) a.push_back(int(c));
  return a;
}

}  // namespace

json openai_logprobs(const OpenAiRequest& r, const Model& m, const cpu::TokenLogprob* lp, size_t n,
                     int64_t text_offset) {
  const Tokenizer& tok = m.tokenizer();
  auto piece = [&](int32_t t) { return tok.token_bytes(t); };
  if (r.endpoint == Endpoint::ChatCompletions) {
    json content = json::array();
    for (size_t i = 0; i < n; ++i) {
      const std::string b = piece(lp[i].token);
      json top = json::array();
      for (const auto& [t, l] : lp[i].top) {
        const std::string tb = piece(t);
        top.push_back({{"token", utf8_sanitize(tb)}, {"logprob", l}, {"bytes", bytes_json(tb)}});
      }
      content.push_back(
          {{"token", utf8_sanitize(b)}, {"logprob", lp[i].logprob}, {"bytes", bytes_json(b)}, {"top_logprobs", top}});
    }
    return {{"content", content}};
  }
  json tokens = json::array(), token_lp = json::array(), top = json::array(), offs = json::array();
  for (size_t i = 0; i < n; ++i) {
    const std::string b = piece(lp[i].token);
    tokens.push_back(utf8_sanitize(b));
    token_lp.push_back(lp[i].logprob);
    json alt = json::object();
    // Tokens whose text is the same (partial UTF-8 sequences) share a key: the most probable stays.
    for (const auto& [t, l] : lp[i].top) alt.emplace(utf8_sanitize(piece(t)), l);
    top.push_back(alt);
    offs.push_back(text_offset);
    text_offset += int64_t(b.size());
  }
  return {{"tokens", tokens}, {"token_logprobs", token_lp}, {"top_logprobs", top}, {"text_offset", offs}};
}

json openai_first_chunk(const OpenAiRequest& r, const std::string& id, int64_t created, int index) {
  if (r.endpoint != Endpoint::ChatCompletions) return nullptr;
  json c = chunk_head(r, id, created);
  c["choices"] = json::array({{{"index", index},
                               {"delta", {{"role", "assistant"}, {"content", ""}}},
                               {"logprobs", nullptr},
                               {"finish_reason", nullptr}}});
  return c;
}

json openai_text_chunk(const OpenAiRequest& r, const std::string& id, int64_t created, int index,
                       const std::string& text, json logprobs) {
  json c = chunk_head(r, id, created);
  json choice = {{"index", index}, {"logprobs", std::move(logprobs)}, {"finish_reason", nullptr}};
  if (r.endpoint == Endpoint::ChatCompletions) choice["delta"] = {{"content", text}};
  else choice["text"] = text;
  c["choices"] = json::array({choice});
  return c;
}

json openai_final_chunk(const OpenAiRequest& r, const GenerateResult& g, const std::string& id, int64_t created,
                        int index, json logprobs, const Model& m, const ServedModels& sm) {
  json c = chunk_head(r, id, created);
  json choice = {{"index", index}, {"logprobs", std::move(logprobs)}, {"finish_reason", finish_name(g)}};
  if (r.endpoint == Endpoint::ChatCompletions) choice["delta"] = json::object();
  else choice["text"] = "";
  c["choices"] = json::array({choice});
  c["atmoe"] = atmoe_ext(r, g, sm);
  if (json t = trace_json(r, g, m, sm); !t.is_null()) c["routing_trace"] = std::move(t);
  return c;
}

json openai_usage_chunk(const OpenAiRequest& r, const std::vector<GenerateResult>& gs, const std::string& id,
                        int64_t created) {
  json c = chunk_head(r, id, created);
  c["choices"] = json::array();
  c["usage"] = usage_json(gs);
  return c;
}

void submit_choices(Scheduler& s, const OpenAiRequest& r, const std::function<RequestEvents(int)>& events,
                    std::vector<RequestId>& ids) {
  for (int i = 0; i < r.n; ++i) {
    GenerateRequest g = r.gen;
    g.seed += uint64_t(i);
    ids.push_back(s.submit(std::move(g), events(i)));
  }
}

json openai_response(const OpenAiRequest& r, const std::vector<GenerateResult>& gs, const std::string& id,
                     int64_t created, const Model& m, const ServedModels& sm) {
  ATMOE_ASSERT(!gs.empty());
  json out;
  out = {{"id", id}, {"object", r.endpoint == Endpoint::ChatCompletions ? "chat.completion" : "text_completion"}};
  out["created"] = created;
  out["model"] = r.model;
  json choices = json::array();
  for (size_t i = 0; i < gs.size(); ++i) {
    const GenerateResult& g = gs[i];
    json choice = {{"index", int(i)}, {"finish_reason", finish_name(g)}, {"logprobs", nullptr}};
    if (r.gen.logprobs >= 0) choice["logprobs"] = openai_logprobs(r, m, g.logprobs.data(), g.logprobs.size(), 0);
    if (r.endpoint == Endpoint::ChatCompletions) choice["message"] = {{"role", "assistant"}, {"content", g.text}};
    else choice["text"] = g.text;
    choices.push_back(std::move(choice));
  }
  out["choices"] = std::move(choices);
  out["usage"] = usage_json(gs);
  const GenerateResult& g = gs[0];
  out["atmoe"] = atmoe_ext(r, g, sm);
  if (json t = trace_json(r, g, m, sm); !t.is_null()) out["routing_trace"] = std::move(t);
  return out;
}

}  // namespace atmoe::app
