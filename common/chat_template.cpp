#include "common/chat_template.h"

#include "common/error.h"

namespace atmoe {

ChatFormat detect_chat_format(const std::string& jinja, const std::string& src) {
  if (jinja.find("<|im_start|>") != std::string::npos) return ChatFormat::ChatML;
  if (jinja.find("<|start_header_id|>") != std::string::npos) return ChatFormat::Llama3;
  ATMOE_CHECK_INPUT(!jinja.empty(), "{}: the model has no chat template (tokenizer.chat_template)", src);
  ATMOE_INPUT_ERROR("{}: chat template not recognised (supported: ChatML, Llama-3)", src);
}

std::string chat_default_system(const std::string& jinja) {
  // SmolLM2: {{ '<|im_start|>system\nYou are ...<|im_end|>\n' }} inside `if loop.first and ... != 'system'`.
  const std::string key = "<|im_start|>system\n";
  size_t a = jinja.find(key);
  if (a == std::string::npos || jinja.find("!= 'system'") == std::string::npos) return {};
  a += key.size();
  size_t b = jinja.find("<|im_end|>", a);
  if (b == std::string::npos) return {};
  return jinja.substr(a, b - a);
}

std::string render_chat(ChatFormat f, const std::vector<ChatMessage>& msgs, const std::string& default_system,
                        bool add_bos_text, const std::string& bos_text) {
  std::string out;
  for (const auto& m : msgs)
    ATMOE_CHECK_INPUT(m.role == "system" || m.role == "user" || m.role == "assistant",
                      "chat message role '{}' (expected system, user or assistant)", m.role);
  if (f == ChatFormat::ChatML) {
    if (!default_system.empty() && (msgs.empty() || msgs[0].role != "system"))
      out += "<|im_start|>system\n" + default_system + "<|im_end|>\n";
    for (const auto& m : msgs) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    out += "<|im_start|>assistant\n";
  } else {
    if (add_bos_text) out += bos_text;
    for (const auto& m : msgs)
      out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + m.content + "<|eot_id|>";
    out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  }
  return out;
}

}  // namespace atmoe
