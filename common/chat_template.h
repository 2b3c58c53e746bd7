// Chat templates: ChatML (SmolLM2, Qwen) and Llama-3, chosen from the model's
// tokenizer.chat_template (or forced by name). Produces the prompt text; special tokens
// in it are parsed by Tokenizer::encode(parse_special=true).
#pragma once
#include <string>
#include <vector>

namespace atmoe {

struct ChatMessage {
  std::string role;  // system | user | assistant
  std::string content;
};

enum class ChatFormat { ChatML, Llama3 };

// Detects the format from a Jinja template string; InputError when neither matches.
ChatFormat detect_chat_format(const std::string& jinja, const std::string& src);
// Renders messages and the assistant prefix. `default_system` (SmolLM2's template adds one
// when the first message is not a system message) is used only for ChatML when non-empty.
std::string render_chat(ChatFormat f, const std::vector<ChatMessage>& msgs, const std::string& default_system,
                        bool add_bos_text, const std::string& bos_text);
// The default system prompt embedded in a ChatML template, if any.
std::string chat_default_system(const std::string& jinja);

}  // namespace atmoe
