// Helpers shared by the sub-commands: flag parsing and checks, and the one-line form of
// every error message (apps/commands.h declares them).
#include <cerrno>
#include <cstdlib>

#include "apps/commands.h"
#include "common/error.h"
#include "common/utf8.h"

namespace atmoe::app {

DType parse_dtype_flag(const std::string& s) {
  if (s == "f32") return DType::F32;
  if (s == "bf16") return DType::BF16;
  if (s.empty()) return DType::BF16;
  ATMOE_INPUT_ERROR("--dtype '{}': expected bf16 or f32", s);
}

uint64_t parse_u64_flag(const char* flag, const std::string& text) {
  bool ok = !text.empty() && text.size() <= 20;
  for (char c : text) ok = ok && c >= '0' && c <= '9';
  errno = 0;
  const unsigned long long v = ok ? std::strtoull(text.c_str(), nullptr, 10) : 0;
  ATMOE_CHECK_INPUT(ok && errno == 0, "{} '{}': expected an integer in 0..18446744073709551615", flag,
                    text.substr(0, 40));
  return uint64_t(v);
}

std::string flag_names(const std::vector<std::string>& controls) {
  std::string o;
  for (const auto& c : controls) {
    std::string f = "--" + c;
    for (char& ch : f)
      if (ch == '_') ch = '-';
    o += (o.empty() ? "" : ", ") + f;
  }
  return o;
}

size_t prompt_bytes_cap(const Model& m) {
  return size_t(m.config().max_position) * m.tokenizer().max_token_bytes() * (m.tokenizer().normalizes() ? 3 : 1);
}

void check_prompt_bytes(const Model& m, const std::string& text, size_t index) {
  const size_t cap = prompt_bytes_cap(m);
  ATMOE_CHECK_INPUT(text.size() <= cap,
                    "prompt {}: {} bytes can never fit the context of {} tokens (at most {} bytes per token: {} bytes)",
                    index, text.size(), m.config().max_position, m.tokenizer().max_token_bytes(), cap);
}

std::string one_line(const std::string& s) {
  // Newlines fold into "; "; other control characters (C0, C1, U+2028/9: a quoted input's
  // bytes) are escaped, so the message stays one line for every reader.
  const std::string v = utf8_sanitize(s);
  std::string o;
  for (size_t i = 0; i < v.size();) {
    const size_t n = utf8_control_len(v, i);
    if (v[i] == '\n' || v[i] == '\r') {
      if (!o.empty() && o.back() != ' ') o += "; ";
    } else if (n == 1) {
      o += fmt::format("\\x{:02x}", uint8_t(v[i]));
    } else if (n > 1) {
      o += fmt::format("\\u{:04x}", n == 2 ? uint8_t(v[i + 1]) : (uint8_t(v[i + 2]) == 0xa8 ? 0x2028 : 0x2029));
    } else {
      o += v[i];
    }
    i += n ? n : 1;
  }
  while (!o.empty() && (o.back() == ' ' || o.back() == ';')) o.pop_back();
  return o;
}

}  // namespace atmoe::app
