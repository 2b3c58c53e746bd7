// OpenAI request bodies (/v1/completions, /v1/chat/completions) -> GenerateRequest, and
// results -> response bodies: what `atmoe batch` reads and writes per line (and what the
// server speaks). docs/batch.md lists the fields.
//
// Models: a request's "model" names the bundle (the routed mixture), the base model
// (routing off) or one expert of the bundle (that expert alone at weight 1, as vLLM serves
// a LoRA by name). Routing controls ride in the extension field "routing" (DESIGN 1.1,
// the same names as the CLI flags with underscores).
//
// Fields that would change the output and are not implemented (tools, response_format,
// echo, best_of, guided decoding, ...) are refused naming the field, never ignored;
// fields that do not (user, metadata, ...) are ignored, as vLLM does.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/bundle.h"
#include "common/chat_template.h"
#include "common/error.h"
#include "coordinator/engine.h"
#include "coordinator/scheduler.h"

namespace atmoe::app {

// An unknown model or expert (HTTP 404; a batch error line with code "model_not_found").
class NotFoundError : public InputError {
 public:
  using InputError::InputError;
};

// A "messages" array ({role, content} with text content) checked (InputError naming
// body.messages[i].field), and its tokens under the model's chat template (with the
// generation prompt), as /v1/chat/completions renders them.
std::vector<ChatMessage> parse_messages(const nlohmann::json& v);
std::vector<int32_t> chat_tokens(const Model& m, const std::vector<ChatMessage>& msgs);

enum class Endpoint { Completions, ChatCompletions };
// "/v1/completions" / "/v1/chat/completions" -> Endpoint; InputError for anything else.
Endpoint parse_endpoint(const std::string& url);

struct ServedModels {
  std::string bundle_id;  // the routed mixture ("" without a bundle)
  std::string base_id;    // the base model alone
  const Bundle* bundle = nullptr;
};
// Ids: the bundle directory's name, the base model file's name without .gguf.
ServedModels served_models(const Model& m, const Bundle* b);

// n: choices per request, at most.
constexpr int kMaxChoices = 8;

// max_tokens of a chat request that gives none (capped by the context).
constexpr int64_t kChatDefaultMaxTokens = 4096;

struct OpenAiRequest {
  Endpoint endpoint = Endpoint::Completions;
  std::string model;    // as given
  GenerateRequest gen;  // prompt tokens, sampling, stop, routing
  bool routing_trace = false;
  int n = 1;                   // choices (each a request of its own, seed + i)
  bool stream = false;         // SSE chunks (the server; a batch refuses it)
  bool include_usage = false;  // stream_options.include_usage: a last chunk with usage
};

// InputError "body.<field>: <what was expected>" for a bad body (NotFoundError for an
// unknown model). seed_default: the seed of a request that gives none.
OpenAiRequest parse_openai_request(const nlohmann::json& body, Endpoint ep, const Model& m, const ServedModels& sm,
                                   uint64_t seed_default);

// The response body: chat.completion or text_completion with one choice per result (n),
// usage (the prompt counted once), plus "atmoe": {"finish_reason", "routing": {group: mean
// weight}} (bundles; of the first choice) and "routing_trace" when asked.
nlohmann::json openai_response(const OpenAiRequest& r, const std::vector<GenerateResult>& gs, const std::string& id,
                               int64_t created, const Model& m, const ServedModels& sm);

// A choice's "logprobs" for n tokens: chat: {"content": [{token, logprob, bytes,
// top_logprobs}]}; completions: {tokens, token_logprobs, top_logprobs, text_offset} (byte
// offsets into the choice's text, from text_offset).
nlohmann::json openai_logprobs(const OpenAiRequest& r, const Model& m, const cpu::TokenLogprob* lp, size_t n,
                               int64_t text_offset);

// Streamed responses (SSE "data: <json>" events, OpenAI's chunk objects), per choice index.
// The first chunk: chat: delta {"role": "assistant", "content": ""}; completions: none (nullptr).
nlohmann::json openai_first_chunk(const OpenAiRequest& r, const std::string& id, int64_t created, int index);
// A text delta (logprobs: of the tokens since the last chunk, or null).
nlohmann::json openai_text_chunk(const OpenAiRequest& r, const std::string& id, int64_t created, int index,
                                 const std::string& text, nlohmann::json logprobs);
// A choice's last chunk: empty delta, finish_reason, "atmoe" and "routing_trace" (when
// asked) as in openai_response.
nlohmann::json openai_final_chunk(const OpenAiRequest& r, const GenerateResult& g, const std::string& id,
                                  int64_t created, int index, nlohmann::json logprobs, const Model& m,
                                  const ServedModels& sm);
// stream_options.include_usage: choices [] and usage.
nlohmann::json openai_usage_chunk(const OpenAiRequest& r, const std::vector<GenerateResult>& gs, const std::string& id,
                                  int64_t created);

// The n choices of r as n scheduler requests, choice i sampled with seed + i; events(i)
// gives choice i's callbacks. Each id is appended to ids as it is queued (a failure part
// way leaves the earlier ones there to cancel).
void submit_choices(Scheduler& s, const OpenAiRequest& r, const std::function<RequestEvents(int)>& events,
                    std::vector<RequestId>& ids);

}  // namespace atmoe::app
