#include "apps/launch.h"

#include "common/comm_mpi.h"
#include "common/error.h"
#include "common/log.h"
#include "coordinator/placement.h"
#include "coordinator/remote_experts.h"

namespace atmoe::app {

void add_placement_flag(CLI::App& app, std::string& file) {
  app.add_option(
      "--placement", file,
      "Under mpirun -n N: a JSON map of worker rank -> expert groups (default: balanced by bytes; docs/deploy.md)");
}

BundleExperts attach_experts(const Bundle& b, Model& m, const std::string& placement_file, bool drain_on_sigterm) {
  MpiSession* s = MpiSession::get();
  const int n = s ? s->size() : 1;
  BundleExperts out;
  if (b.method == "t-rex") {
    ATMOE_CHECK_INPUT(placement_file.empty(),
                      "--placement: {} is a t-rex bundle; t-rex experts run on rank 0 (docs/deploy.md)", b.dir);
    if (n > 1)
      ATMOE_LOG("coord")->warn(
          "{} is a t-rex bundle: its experts run on rank 0; ranks 1..{} stay idle (docs/deploy.md)", b.dir, n - 1);
    out.trex = std::make_unique<TrexPool>(b, m.config(), m.dtype());
  } else if (n == 1) {
    ATMOE_CHECK_INPUT(placement_file.empty(),
                      "--placement places expert groups on worker ranks: run under mpirun -n N (N >= 2)");
    out.atmoe = std::make_unique<ExpertPool>(b, m.config(), m.dtype());
  } else {
    const Placement p = placement_file.empty() ? plan_placement(b, n - 1) : read_placement(placement_file, b, n - 1);
    ATMOE_LOG("coord")->info("{}", describe_placement(b, p));
    auto remote = std::make_unique<RemoteExperts>(*s, b, m.config(), m.dtype(), p, drain_on_sigterm);
    out.atmoe = std::make_unique<ExpertPool>(b, m.config(), std::move(remote));
  }
  m.set_experts(out.dispatch());
  return out;
}

}  // namespace atmoe::app
