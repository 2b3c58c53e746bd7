// Routing traces: the weights a request was served with, as JSON:
//   {"layers": [{"layer": l, "groups": {NAME: a, ...}, "experts": {NAME: w, ...}}, ...],
//    "tokens": [{"token": i, "layers": [{"layer": l, "experts": {...}}, ...]}, ...]}   // per_token only
// For per_token routing "groups"/"experts" are the means over the request's tokens.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "coordinator/experts.h"

namespace atmoe {

nlohmann::json routing_trace(const Bundle& b, const SeqRouting& r);
class TrexPool;
// T-REX: {"method": "t-rex", "mode": ..., "intuition": [C e], "omega": ..., "routing": "off"?}
nlohmann::json trex_trace(const TrexPool& t, const SeqRouting& r);
// Groups ordered by their mean weight over layers, heaviest first.
std::vector<std::pair<std::string, double>> heaviest_groups(const Bundle& b, const SeqRouting& r);

}  // namespace atmoe
