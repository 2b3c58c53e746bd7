// The routing heatmap of `atmoe explain`: an SVG with one row per layer, one column per
// expert (columns banded by group, group names above), cell colour = expert weight w_l[e]
// (the same colour scale for every cell, legend included), and the group weights a_l
// beside each row as a second, narrower heatmap.
#pragma once
#include <string>

#include "coordinator/experts.h"

namespace atmoe {

std::string routing_heatmap_svg(const Bundle& b, const SeqRouting& r, const std::string& title);

}  // namespace atmoe
