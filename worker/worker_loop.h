// A worker rank's life (DESIGN.md 3): wait for the coordinator's hello, load the expert
// groups it names into an ExpertShard, answer Work messages with partial sums until a
// shutdown. A failure while loading (a bad bundle, another build) is sent back in Ready
// for the coordinator to report once; the worker itself prints nothing on stdout.
#pragma once

namespace atmoe {

class MpiSession;

// Runs sessions until the coordinator's final shutdown; returns the exit code it carries.
int run_worker(MpiSession& s);

}  // namespace atmoe
