// The `atmoe` entry point: parses the command and runs it. Errors become one line on
// stderr ("atmoe: error: <file/field>: <problem>") and an exit code: 2 for bad input
// (files, flags, requests), 1 for internal failures.
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "apps/commands.h"
#include "common/env.h"
#include "common/error.h"
#include "common/log.h"
#include "common/utf8.h"
#include "kernels/cpu/cpu_features.h"

#ifdef ATMOE_HAVE_CUDA
#include "kernels/cuda/device.cuh"
#endif

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
  ATMOE_CHECK_INPUT(ok && errno == 0, "{} '{}': expected an integer in 0..18446744073709551615", flag, text.substr(0, 40));
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

void check_prompt_bytes(const Model& m, const std::string& text, size_t index) {
  const size_t cap = size_t(m.config().max_position) * m.tokenizer().max_token_bytes() * (m.tokenizer().normalizes() ? 3 : 1);
  ATMOE_CHECK_INPUT(text.size() <= cap,
                    "prompt {}: {} bytes can never fit the context of {} tokens (at most {} bytes per token: {} bytes)", index,
                    text.size(), m.config().max_position, m.tokenizer().max_token_bytes(), cap);
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

std::string compute_device_line() {
  std::string line = fmt::format("cpu ({})", cpu::isa_name(cpu::best_isa()));
#ifdef ATMOE_HAVE_CUDA
  std::string why;
  int n = cuda::device_count(&why);
  if (n > 0) line += fmt::format("; cuda devices: {} ({})", n, cuda::device_name(0));
  else line += fmt::format("; no CUDA device ({}), using the CPU", why);
#else
  line += "; built without CUDA";
#endif
  return line;
}

}  // namespace atmoe::app

// Every option takes exactly one non-empty value per occurrence: `--temperature ""` is an
// error, not the default, and `--prompt a b` is not two prompts.
static void strict_options(CLI::App& app) {
  const CLI::Validator non_empty([](std::string& v) { return v.empty() ? std::string("an empty value") : std::string(); },
                                 "", "NonEmpty");
  for (CLI::Option* opt : app.get_options())
    if (opt->get_type_size() != 0 && !opt->get_positional()) opt->check(non_empty)->allow_extra_args(false);
  for (CLI::App* sub : app.get_subcommands({})) strict_options(*sub);
}

// stdout (text, tables, help) must have reached its destination before exit 0.
static int check_stdout(int rc) {
  std::cout.flush();
  if (rc == 0 && (!std::cout || std::fflush(stdout) != 0 || std::ferror(stdout))) {
    std::fprintf(stderr, "atmoe: error: writing the output to stdout failed: %s\n", std::strerror(errno));
    return 1;
  }
  return rc;
}

int main(int argc, char** argv) {
  using namespace atmoe;
  // A closed pipe (`atmoe generate ... | head -c 1`) is a failed write (exit 1), not a signal.
  std::signal(SIGPIPE, SIG_IGN);
  log_init();
  CLI::App app{"atmoe: task-routed mixtures of LoRA experts on one frozen base LLM"};
  app.require_subcommand(0, 1);
  bool help_env = false;
  app.add_flag("--help-env", help_env, "List the environment variables atmoe reads");
  app::Runner run;
  std::vector<std::pair<CLI::App*, app::Runner>> cmds;
  auto reg = [&](const char* name, const char* desc, app::Runner (*f)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, desc);
    cmds.emplace_back(sub, f(*sub));
  };
  reg("generate", "Generate text from a prompt", app::add_generate);
  reg("inspect", "Print a model's architecture, sizes, dtypes and tokenizer", app::add_inspect);
  reg("synth-model", "Write a deterministic tiny HF-format model", app::add_synth_model);
  reg("synth-bundle", "Write a deterministic bundle of random PEFT experts and routers", app::add_synth_bundle);
  reg("explain", "Draw a prompt's routing (layers x experts) as an SVG heatmap", app::add_explain);
  reg("bench", "Measure prefill/decode speed and the memory-bandwidth floor", app::add_bench);
  strict_options(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return check_stdout(app.exit(e));
  } catch (const CLI::CallForAllHelp& e) {
    return check_stdout(app.exit(e));
  } catch (const CLI::CallForVersion& e) {
    return check_stdout(app.exit(e));
  } catch (const CLI::ParseError& e) {
    // One line, as for every other bad input (CLI11's own exit() adds a second line).
    std::fprintf(stderr, "atmoe: error: %s (see --help)\n", app::one_line(e.what()).c_str());
    return 2;
  }
  try {
    env_check_all();
    (void)cpu::best_isa();
    if (help_env) {
      for (const auto& k : env_knobs()) std::printf("%-18s default '%s'\n    %s\n", k.name, k.default_value, k.doc);
      return check_stdout(0);
    }
    for (auto& [sub, r] : cmds)
      if (sub->parsed()) return check_stdout(r());
    std::cout << app.help();
    return check_stdout(0);
  } catch (const Error& e) {
    std::fprintf(stderr, "atmoe: error: %s\n", app::one_line(e.what()).c_str());
    return e.exit_code();
  } catch (const std::filesystem::filesystem_error& e) {
    std::fprintf(stderr, "atmoe: error: %s\n", app::one_line(e.what()).c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "atmoe: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "atmoe: error: %s\n", app::one_line(e.what()).c_str());
    return 1;
  }
}
