// Helpers shared by the sub-commands: flag parsing and checks, and the one-line form of
// every error message (apps/commands.h declares them).
#include <cerrno>
#include <cstdlib>

#include "apps/commands.h"
#include "common/error.h"
#include "common/utf8.h"

namespace atmoe::app {

void add_device_flag(CLI::App& app, std::string& device) {
  app.add_option("--device", device, "Where the model runs: cpu (default), cuda or cuda:N");
}

std::unique_ptr<Backend> device_backend(const std::string& device) {
  if (device.empty() || device == "cpu") return nullptr;
  return make_backend(device);
}

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

void add_scheduler_flags(CLI::App& app, SchedulerFlags& f) {
  app.add_option("--max-batch-tokens", f.max_batch_tokens, "Tokens per forward step (prefill chunking)");
  app.add_option("--max-running", f.max_running, "Requests decoding at once");
  app.add_option("--kv-budget-mib", f.kv_budget_mib, "KV-cache memory for the running requests, MiB");
}

SchedulerOptions scheduler_options(const SchedulerFlags& f) {
  ATMOE_CHECK_INPUT(f.max_batch_tokens >= 1 && f.max_batch_tokens <= (1 << 20),
                    "--max-batch-tokens {}: must be in 1..1048576", f.max_batch_tokens);
  ATMOE_CHECK_INPUT(f.max_running >= 1 && f.max_running <= 4096, "--max-running {}: must be in 1..4096",
                    f.max_running);
  ATMOE_CHECK_INPUT(f.kv_budget_mib >= 1 && f.kv_budget_mib <= (int64_t(1) << 30),
                    "--kv-budget-mib {}: must be in 1..2^30", f.kv_budget_mib);
  SchedulerOptions so;
  so.max_batch_tokens = f.max_batch_tokens;
  so.max_running = f.max_running;
  so.kv_budget_bytes = f.kv_budget_mib << 20;
  return so;
}

void check_kv_budget(const Scheduler& s, const GenerateRequest& r, int64_t kv_budget_mib) {
  const int64_t total = int64_t(r.prompt.size()) + r.max_tokens;
  if (s.kv_bytes(total) > kv_budget_mib << 20)
    throw InputError(fmt::format(
        "prompt ({} tokens) + max_tokens ({}) need {:.0f} MiB of KV cache, over --kv-budget-mib {}: lower max_tokens "
        "or raise the budget",
        r.prompt.size(), r.max_tokens, double(s.kv_bytes(total)) / (1 << 20), kv_budget_mib));
}

}  // namespace atmoe::app
