// atmoe inspect PATH: architecture, sizes, dtypes, tokenizer summary; and synth-model.
#include <chrono>
#include <filesystem>
#include <iostream>

#include "apps/commands.h"
#include "common/error.h"
#include "common/files.h"
#include "coordinator/model.h"
#include "coordinator/placement.h"
#include "coordinator/synth_model.h"

namespace atmoe::app {

Runner add_inspect(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  auto dtype = std::make_shared<std::string>();
  auto check = std::make_shared<bool>(false);
  app.add_option("path", *path, "A .gguf file, an HF model directory or a bundle directory")->required();
  app.add_option("--dtype", *dtype, "Precision to load in (bf16|f32)");
  app.add_flag("--check-tensors", *check, "Check every weight for NaN/Inf (base model and experts)");
  auto ranks = std::make_shared<int>(0);
  auto map = std::make_shared<std::string>();
  CLI::Option* placement = app.add_option(
      "--placement", *ranks, "Bundles: print the placement of the expert groups over N MPI ranks (N >= 2) and exit");
  app.add_option("--placement-map", *map,
                 "With --placement N: check and print this placement file instead of the automatic plan");
  return [path, dtype, check, ranks, map, placement]() -> int {
    const bool plan = placement->count() > 0;  // also --placement 0: refused below, not ignored
    ATMOE_CHECK_INPUT(map->empty() || plan, "--placement-map needs --placement N (the job's rank count)");
    if (plan) {
      ATMOE_CHECK_INPUT(*ranks >= 2 && *ranks <= 65536,
                        "--placement {}: a job of 2..65536 ranks (rank 0 coordinates, the rest hold experts)", *ranks);
      ATMOE_CHECK_INPUT(path_kind(*path, "inspect") == PathKind::Directory &&
                            path_exists((std::filesystem::path(*path) / "atmoe.json").string(), "bundle manifest"),
                        "--placement: {} is not a bundle directory (atmoe.json)", *path);
      const Bundle b = load_bundle_manifest(*path);
      ATMOE_CHECK_INPUT(b.method == "at-moe",
                        "--placement: {} is a {} bundle; its experts run on rank 0 (docs/deploy.md)", *path, b.method);
      const Placement p =
          map->empty() ? plan_placement(b, *ranks - 1) : read_placement(*map, b, *ranks - 1, "--placement-map");
      std::cout << describe_placement(b, p);
      return 0;
    }
    if (path_kind(*path, "inspect") == PathKind::Directory &&
        path_exists((std::filesystem::path(*path) / "atmoe.json").string(), "bundle manifest"))
      return inspect_bundle(*path, *check);
    const auto t0 = std::chrono::steady_clock::now();
    auto m = Model::load(*path, parse_dtype_flag(*dtype), *check);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto& c = m->config();
    std::cout << "path:         " << *path << " (" << m->info().format << ")\n";
    std::cout << "architecture: " << c.summary() << "\n";
    std::cout << "parameters:   " << m->info().n_params << "\n";
    std::cout << "source dtypes: ";
    for (auto& s : m->info().source_dtypes) std::cout << s << "  ";
    std::cout << "\nloaded as:    " << dtype_name(m->dtype()) << ", " << m->weight_bytes() / (1 << 20)
              << " MiB of weights read per decode step\n";
    std::cout << "tokenizer:    " << m->tokenizer().summary() << "\n";
    std::cout << "compute:      " << compute_device_line() << "\n";
    std::cout << fmt::format("load:         {:.2f} s{}\n", load_s, *check ? " (every weight checked finite)" : "");
    return 0;
  };
}

Runner add_synth_model(CLI::App& app) {
  auto o = std::make_shared<SynthModelOptions>();
  app.add_option("--out", o->out, "Output directory")->required();
  auto seed = std::make_shared<std::string>();
  app.add_option("--seed", *seed, "Random seed, 0..18446744073709551615")->required();
  app.add_option("--layers", o->layers, "Decoder layers");
  app.add_option("--hidden", o->hidden, "Hidden size");
  app.add_option("--heads", o->heads, "Attention heads");
  app.add_option("--kv-heads", o->kv_heads, "Key/value heads (GQA)");
  app.add_option("--ffn", o->ffn, "MLP intermediate size");
  app.add_option("--vocab", o->vocab, "Vocabulary size");
  app.add_option("--max-position", o->max_position, "Context length");
  app.add_option("--arch", o->arch, "llama (default) or qwen2 (q/k/v biases)");
  auto force = std::make_shared<bool>(false);
  app.add_flag("--force", *force, "Write into an existing non-empty --out directory");
  return [o, force, seed]() -> int {
    o->seed = parse_u64_flag("--seed", *seed);
    prepare_output_dir(o->out, *force, "--out");
    synth_model(*o);
    std::cerr << "wrote " << o->out << "\n";
    return 0;
  };
}

}  // namespace atmoe::app
