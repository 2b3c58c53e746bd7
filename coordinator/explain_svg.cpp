#include "coordinator/explain_svg.h"

#include "coordinator/svg.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include <fmt/format.h>

namespace atmoe {


std::string routing_heatmap_svg(const Bundle& b, const SeqRouting& r, const std::string& title) {
  const int L = int(r.w.size()), E = int(b.experts.size()), G = int(b.groups.size());
  const int cell_w = std::max(10, std::min(28, 900 / std::max(1, E))), cell_h = std::max(8, std::min(18, 600 / std::max(1, L)));
  const int gap = 6, left = 60, top = 135, gcell = 22;
  double wmax = 1e-12;
  for (auto& row : r.w)
    for (double v : row) wmax = std::max(wmax, v);
  const int grid_w = E * cell_w + (G - 1) * gap;
  const int gx0 = left + grid_w + 40;
  const int width = gx0 + G * gcell + 150, height = top + L * cell_h + 70;
  std::ostringstream s;
  s << fmt::format(R"s(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">)s", width, height)
    << "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  s << fmt::format(R"s(<text x="{}" y="20" font-size="14" font-weight="bold">{}</text>)s", left, svg_escape(title)) << "\n";
  s << fmt::format(R"s(<text x="{}" y="38" fill="#444">expert weights w[layer][expert] (colour scale 0 .. {:.3f}); right: group weights a[layer] (0 .. 1)</text>)s",
                   left, wmax) << "\n";
  // Columns: experts banded by group.
  std::vector<int> col_x(static_cast<size_t>(E));
  int x = left;
  for (int g = 0; g < G; ++g) {
    const auto& ex = b.groups[size_t(g)].experts;
    int gx = x;
    for (int e : ex) {
      col_x[size_t(e)] = x;
      s << fmt::format(R"s(<text transform="translate({},{}) rotate(-60)" font-size="9">{}</text>)s", x + cell_w / 2 + 3, top - 4,
                       svg_escape(b.experts[size_t(e)].name)) << "\n";
      x += cell_w;
    }
    s << fmt::format(R"s(<rect x="{}" y="{}" width="{}" height="4" fill="#888"/>)s", gx, top - 2 - 60, x - gx) << "\n";
    s << fmt::format(R"s(<text x="{}" y="{}" font-weight="bold">{}</text>)s", gx, top - 66, svg_escape(b.groups[size_t(g)].name)) << "\n";
    x += gap;
  }
  for (int l = 0; l < L; ++l) {
    int y = top + l * cell_h;
    if (l % std::max(1, L / 15) == 0)
      s << fmt::format(R"s(<text x="{}" y="{}" text-anchor="end" font-size="9">layer {}</text>)s", left - 4, y + cell_h - 2, l) << "\n";
    for (int e = 0; e < E; ++e) {
      double v = r.w[size_t(l)][size_t(e)];
      s << fmt::format(R"s(<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>layer {} {}: {:.4f}</title></rect>)s",
                       col_x[size_t(e)], y, cell_w - 1, cell_h - 1, svg_color(v / wmax), l, svg_escape(b.experts[size_t(e)].name), v)
        << "\n";
    }
    for (int g = 0; g < G; ++g) {
      double v = r.a[size_t(l)][size_t(g)];
      s << fmt::format(R"s(<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>layer {} group {}: {:.4f}</title></rect>)s",
                       gx0 + g * gcell, y, gcell - 1, cell_h - 1, svg_color(v), l, svg_escape(b.groups[size_t(g)].name), v) << "\n";
    }
  }
  for (int g = 0; g < G; ++g)
    s << fmt::format(R"s(<text transform="translate({},{}) rotate(-60)" font-size="9">{}</text>)s", gx0 + g * gcell + gcell / 2 + 3,
                     top - 4, svg_escape(b.groups[size_t(g)].name)) << "\n";
  // Mean group weight under the group column.
  for (int g = 0; g < G; ++g) {
    double m = 0;
    for (int l = 0; l < L; ++l) m += r.a[size_t(l)][size_t(g)];
    m /= std::max(1, L);
    s << fmt::format(R"s(<text transform="translate({},{}) rotate(60)" font-size="9">{:.2f}</text>)s", gx0 + g * gcell + 6,
                     top + L * cell_h + 4, m) << "\n";
  }
  // Legend.
  int ly = top + L * cell_h + 40;
  for (int i = 0; i <= 20; ++i)
    s << fmt::format(R"s(<rect x="{}" y="{}" width="10" height="10" fill="{}"/>)s", left + i * 10, ly, svg_color(i / 20.0)) << "\n";
  s << fmt::format(R"s(<text x="{}" y="{}">0</text><text x="{}" y="{}">{:.3f} (experts) / 1 (groups)</text>)s", left, ly + 22,
                   left + 200, ly + 22, wmax) << "\n";
  s << "</svg>\n";
  return s.str();
}

}  // namespace atmoe
