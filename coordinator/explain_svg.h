// The routing heatmap of `atmoe explain`: an SVG with one row per layer, one column per
// expert (columns banded by group, group names above), cell colour = expert weight w_l[e]
// (the same colour scale for every cell, legend included), and the group weights a_l
// beside each row as a second, narrower heatmap.
#pragma once
#include <string>
#include <vector>

#include "coordinator/experts.h"

namespace atmoe {

std::string routing_heatmap_svg(const Bundle& b, const SeqRouting& r, const std::string& title);

// The report picture of `atmoe fit-router`: per layer, the group-routing accuracy (top) and
// cross-entropy (bottom) on the training and held-out lines (NaN: no held-out line).
std::string fit_report_svg(const std::string& title, const std::vector<double>& train_acc,
                           const std::vector<double>& heldout_acc, const std::vector<double>& train_ce,
                           const std::vector<double>& heldout_ce);

}  // namespace atmoe
