// Routing traces: the weights a request was served with, as JSON (docs/usage.md):
//   {"method": "at-moe", "input": "per_request"|"per_token", "lambda": λ,
//    "general_expert": NAME (when the bundle has one), "adapter": NAME (with an adapter control),
//    "routing": "off" (routing off: no weights),
//    "layers": [{"layer": l, "groups": {NAME: a, ...}, "experts": {NAME: w, ...}}, ...],
//    "tokens": [{"position": p, "token_id": id, "layers": [{"layer": l, "groups": {...},
//                "experts": {...}}, ...]}, ...]}                       // per_token routing only
// w are the expert weights before λ (the delta is λ Σ w_e s_e B_e A_e x + (1 − λ) general).
// For per_token routing "layers" holds the means over the routed tokens; "tokens" one entry
// per token that went through the model: the prompt, then each generated token but the
// last (positions from 0). fed_tokens: those ids (prompt ++ generated), for "token_id".
#pragma once
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "coordinator/experts.h"

namespace atmoe {

nlohmann::json routing_trace(const Bundle& b, const SeqRouting& r, const std::vector<int32_t>& fed_tokens = {});
class TrexPool;
// T-REX: {"method": "t-rex", "mode": ..., "intuition": [C e], "omega": ..., "routing": "off"?}
nlohmann::json trex_trace(const TrexPool& t, const SeqRouting& r);
// Groups ordered by their mean weight over layers, heaviest first.
std::vector<std::pair<std::string, double>> heaviest_groups(const Bundle& b, const SeqRouting& r);

}  // namespace atmoe
