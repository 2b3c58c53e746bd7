// The `atmoe` entry point: parses the command and runs it. Errors become one line on
// stderr ("atmoe: error: <file/field>: <problem>") and an exit code: 2 for bad input
// (files, flags, requests), 1 for internal failures.
#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "apps/commands.h"
#include "common/comm_mpi.h"
#include "common/env.h"
#include "common/error.h"
#include "common/log.h"
#include "common/utf8.h"
#include "coordinator/remote_experts.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_features.h"
#include "worker/worker_loop.h"


namespace atmoe::app {

// The backends this build has and whether each can run here (the registry knows which
// were compiled in).
std::string compute_device_line() {
  std::string line = fmt::format("cpu ({})", cpu::isa_name(cpu::best_isa()));
  const auto names = backend_names();
  if (std::find(names.begin(), names.end(), "cuda") == names.end()) return line + "; built without CUDA";
  std::string why;
  if (!backend_available("cuda", &why)) return line + fmt::format("; {}, using the CPU (--device cuda refused)", why);
  return line + fmt::format("; {} (--device cuda)", make_backend("cuda")->description());
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

// Whether the failure leaves the MPI job unable to shut down cleanly (a worker that does not
// answer): main then aborts the job after its own line.
static bool g_comm_failed = false;

// Rank 0 under mpirun, about to print its one error line: the launcher's SIGTERM (sent
// when a rank ends early) must neither add a second line nor cut the exit short.
static void quiet_sigterm() {
  if (atmoe::MpiSession::get()) std::signal(SIGTERM, SIG_IGN);
}

static int run_command(int argc, char** argv) {
  using namespace atmoe;
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
  reg("fit-router", "Fit a bundle's grouped router on labelled prompts (docs/fitting.md)", app::add_fit_router);
  reg("fit-intuition", "Fit a T-REX bundle's intuition centroids by k-means++ (docs/fitting.md)", app::add_fit_intuition);
  reg("explain", "Draw a prompt's routing (layers x experts) as an SVG heatmap", app::add_explain);
  reg("batch", "Run an OpenAI Batch API JSONL file (resumable; docs/batch.md)", app::add_batch);
  reg("serve", "Serve the OpenAI-compatible HTTP API (docs/api.md)", app::add_serve);
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
    (void)cpu::gemv_prefetch();
    if (help_env) {
      for (const auto& k : env_knobs()) std::printf("%-18s default '%s'\n    %s\n", k.name, k.default_value, k.doc);
      return check_stdout(0);
    }
    for (auto& [sub, r] : cmds)
      if (sub->parsed()) return check_stdout(r());
    std::cout << app.help();
    return check_stdout(0);
  } catch (const CommError& e) {
    g_comm_failed = true;
    quiet_sigterm();
    std::fprintf(stderr, "atmoe: error: %s\n", app::one_line(e.what()).c_str());
    return 1;
  } catch (const Error& e) {
    quiet_sigterm();
    std::fprintf(stderr, "atmoe: error: %s\n", app::one_line(e.what()).c_str());
    return e.exit_code();
  } catch (const std::filesystem::filesystem_error& e) {
    quiet_sigterm();
    std::fprintf(stderr, "atmoe: error: %s\n", app::one_line(e.what()).c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    quiet_sigterm();
    std::fprintf(stderr, "atmoe: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    quiet_sigterm();
    std::fprintf(stderr, "atmoe: error: %s\n", app::one_line(e.what()).c_str());
    return 1;
  }
}

int main(int argc, char** argv) {
  using namespace atmoe;
  // A closed pipe (`atmoe generate ... | head -c 1`) is a failed write (exit 1), not a signal.
  std::signal(SIGPIPE, SIG_IGN);
  // Under a launcher (mpirun, srun): rank 0 runs the command, ranks 1..N-1 serve experts.
  MpiSession* mpi = launched_by_mpi() ? &MpiSession::init(&argc, &argv) : nullptr;
  log_init(mpi && mpi->size() > 1 ? mpi->rank() : -1);
  if (mpi && mpi->rank() > 0) {
    int code = 1;
    try {
      code = run_worker(*mpi);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "atmoe: error: rank %d (host %s): %s\n", mpi->rank(), mpi->host().c_str(),
                   app::one_line(e.what()).c_str());
      mpi->abort(1);
    }
    mpi->finalize();
    return code;
  }
  const int rc = run_command(argc, argv);
  if (mpi) {
    if (g_comm_failed) mpi->abort(rc ? rc : 1);
    if (!end_workers(*mpi, rc)) mpi->abort(rc ? rc : 1);
    mpi->finalize();
  }
  return rc;
}
