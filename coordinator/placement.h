// Which worker rank holds which expert groups (DESIGN.md 3). Whole groups per worker; the
// general expert, when the bundle has one, is placed like one more group. Worker w is
// MPI rank w + 1 (rank 0 is the coordinator and holds no expert banks when N > 1).
//
// Automatic: balanced by bytes (the adapters' weight files), largest unit first onto the
// lightest worker (ties: lowest rank), so a worker's memory follows its share.
// --placement FILE (JSON) overrides, e.g. for 3 ranks:
//   {"1": ["medicine", "law"], "2": ["support", "general"]}
// keys: worker ranks 1..N-1, each with at least one unit; values: group names (and the
// general expert's name); every group exactly once.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/bundle.h"

namespace atmoe {

struct Placement {
  std::vector<std::vector<int>> groups;  // [n_workers]: group indices held, ascending
  int general_worker = -1;               // worker holding the general expert, or -1
  std::vector<int64_t> bytes;            // [n_workers]: bytes of the adapters held
  int n_workers() const { return int(groups.size()); }
};

// Bytes of one expert's weights (its adapter_model.safetensors).
int64_t expert_file_bytes(const BundleExpert& e);
// InputError when there are more workers than units (naming the largest rank count).
Placement plan_placement(const Bundle& b, int n_workers);
// InputError naming the file and key for anything but a complete, valid map; `flag` names the
// option that gave the file (a missing or unreadable file).
Placement read_placement(const std::string& path, const Bundle& b, int n_workers, const char* flag = "--placement");
// A table: rank, groups, experts, MiB.
std::string describe_placement(const Bundle& b, const Placement& p);

}  // namespace atmoe
