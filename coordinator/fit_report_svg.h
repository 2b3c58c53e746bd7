// The report picture of `atmoe fit-router`: per layer, the group-routing accuracy (top)
// and cross-entropy (bottom) on the training and held-out lines (NaN: no held-out line).
#pragma once
#include <string>
#include <vector>

namespace atmoe {

std::string fit_report_svg(const std::string& title, const std::vector<double>& train_acc,
                           const std::vector<double>& heldout_acc, const std::vector<double>& train_ce,
                           const std::vector<double>& heldout_ce);

}  // namespace atmoe
