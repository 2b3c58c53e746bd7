// Sub-commands of the `atmoe` binary. Each registers its options on the CLI11 app and
// returns the callback that runs it (an exit code).
#pragma once
#include <functional>

#include <CLI/CLI.hpp>

#include "common/dtype.h"
#include "coordinator/model.h"
#include "coordinator/scheduler.h"

namespace atmoe::app {

using Runner = std::function<int()>;
Runner add_generate(CLI::App& app);
Runner add_inspect(CLI::App& app);
Runner add_synth_model(CLI::App& app);
Runner add_bench(CLI::App& app);
Runner add_batch(CLI::App& app);
Runner add_serve(CLI::App& app);
Runner add_synth_bundle(CLI::App& app);
Runner add_fit_router(CLI::App& app);
Runner add_fit_intuition(CLI::App& app);
int inspect_bundle(const std::string& dir, bool check_tensors);

// Tokenises a prompt, optionally wrapped in the model's chat template.
std::vector<int32_t> encode_prompt(const Model& m, const std::string& text, bool chat, const std::string& system);
Runner add_explain(CLI::App& app);

// --device cpu|cuda|cuda:N: where the model runs (kernels/backend.h). add_device_flag
// registers it; device_backend returns the backend to run on (nullptr: the CPU's shared
// one), InputError for an unknown name, a backend this build lacks or a missing GPU. A
// bundle's in-process experts run on the same backend (attach_experts).
void add_device_flag(CLI::App& app, std::string& device);
std::unique_ptr<Backend> device_backend(const std::string& device);

// Shared: parses "bf16"|"f32" (default: bf16 when the CPU has AVX-512 or AVX2, else f32).
DType parse_dtype_flag(const std::string& s);
std::string compute_device_line();
// A flag's unsigned 64-bit value, range-checked before conversion (InputError naming the flag).
uint64_t parse_u64_flag(const char* flag, const std::string& text);
// "top_k_groups" -> "--top-k-groups", joined with ", ".
std::string flag_names(const std::vector<std::string>& controls);
// A prompt of more bytes than the context length times the longest token's bytes can never
// fit: refused before tokenizing it (InputError naming the prompt).
void check_prompt_bytes(const Model& m, const std::string& text, size_t index);
// That bound in bytes (NFC-normalizing tokenizers: three times, since NFC can shrink text).
size_t prompt_bytes_cap(const Model& m);
constexpr size_t kMaxPromptFileBytes = size_t(64) << 20;
// The scheduler's flags of `batch` and `serve`: --max-batch-tokens, --max-running,
// --kv-budget-mib.
struct SchedulerFlags {
  int64_t max_batch_tokens = 512, kv_budget_mib = 4096;
  int max_running = 64;
};
void add_scheduler_flags(CLI::App& app, SchedulerFlags& f);
// The flags checked (InputError naming the flag) as SchedulerOptions (max_queue left default).
SchedulerOptions scheduler_options(const SchedulerFlags& f);
// A request whose KV cache alone is over --kv-budget-mib: InputError naming both.
void check_kv_budget(const Scheduler& s, const GenerateRequest& r, int64_t kv_budget_mib);
// Newlines folded into "; ": every error is one line on stderr.
std::string one_line(const std::string& s);

}  // namespace atmoe::app
