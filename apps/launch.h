// A command's bundle experts: in this process (one rank), or sharded over the MPI job's
// worker ranks (mpirun -n N: rank 0 runs the command, ranks 1..N-1 hold expert groups).
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "common/bundle.h"
#include "coordinator/experts.h"
#include "coordinator/model.h"
#include "coordinator/trex_pool.h"

namespace atmoe::app {

struct BundleExperts {
  std::unique_ptr<ExpertPool> atmoe;
  std::unique_ptr<TrexPool> trex;
  ExpertDispatch* dispatch() const {
    return atmoe ? static_cast<ExpertDispatch*>(atmoe.get()) : static_cast<ExpertDispatch*>(trex.get());
  }
};

void add_placement_flag(CLI::App& app, std::string& file);
// Loads the experts of `b` for `m` (the model's dtype) and attaches them to the model.
// drain_on_sigterm: the workers ignore SIGTERM (the command drains on it, then ends them).
BundleExperts attach_experts(const Bundle& b, Model& m, const std::string& placement_file,
                             bool drain_on_sigterm = false);

}  // namespace atmoe::app
