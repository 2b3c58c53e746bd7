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
  // Experts in this process live on the model's backend when it is a device (their banks
  // beside its weights); on the CPU each gets a context of its own.
  Backend* eb = m.backend().host_memory() ? nullptr : &m.backend();
  ATMOE_CHECK_INPUT(n == 1 || b.method == "t-rex" || m.backend().host_memory(),
                    "--device {}: expert workers under mpirun exchange host buffers; run the model on --device cpu "
                    "there, or in one process on the GPU (the NCCL collect is not built yet)",
                    m.backend().name());
  if (b.method == "t-rex") {
    ATMOE_CHECK_INPUT(placement_file.empty(),
                      "--placement: {} is a t-rex bundle; t-rex experts run on rank 0 (docs/deploy.md)", b.dir);
    if (n > 1)
      ATMOE_LOG("coord")->warn(
          "{} is a t-rex bundle: its experts run on rank 0; ranks 1..{} stay idle (docs/deploy.md)", b.dir, n - 1);
    out.trex = std::make_unique<TrexPool>(b, m.config(), m.dtype(), eb);
  } else if (n == 1) {
    ATMOE_CHECK_INPUT(placement_file.empty(),
                      "--placement places expert groups on worker ranks: run under mpirun -n N (N >= 2)");
    out.atmoe = std::make_unique<ExpertPool>(b, m.config(), m.dtype(), /*zero_router=*/false, eb);
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
