#include "coordinator/explain_svg.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include <fmt/format.h>

namespace atmoe {

namespace {
// A perceptually ordered ramp (viridis endpoints and midpoints), t in [0, 1].
std::string color(double t) {
  static const double stops[][3] = {{68, 1, 84},    {59, 82, 139},  {33, 145, 140},
                                    {94, 201, 98},  {253, 231, 37}};
  t = std::clamp(t, 0.0, 1.0) * 4.0;
  int i = std::min(3, int(t));
  double f = t - i;
  int c[3];
  for (int k = 0; k < 3; ++k) c[k] = int(std::lround(stops[i][k] + f * (stops[i + 1][k] - stops[i][k])));
  return fmt::format("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
}

std::string esc(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '<') o += "&lt;";
    else if (ch == '>') o += "&gt;";
    else if (ch == '&') o += "&amp;";
    else if (ch == '"') o += "&quot;";
    else o += ch;
  }
  return o;
}
}  // namespace

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
  s << fmt::format(R"s(<text x="{}" y="20" font-size="14" font-weight="bold">{}</text>)s", left, esc(title)) << "\n";
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
                       esc(b.experts[size_t(e)].name)) << "\n";
      x += cell_w;
    }
    s << fmt::format(R"s(<rect x="{}" y="{}" width="{}" height="4" fill="#888"/>)s", gx, top - 2 - 60, x - gx) << "\n";
    s << fmt::format(R"s(<text x="{}" y="{}" font-weight="bold">{}</text>)s", gx, top - 66, esc(b.groups[size_t(g)].name)) << "\n";
    x += gap;
  }
  for (int l = 0; l < L; ++l) {
    int y = top + l * cell_h;
    if (l % std::max(1, L / 15) == 0)
      s << fmt::format(R"s(<text x="{}" y="{}" text-anchor="end" font-size="9">layer {}</text>)s", left - 4, y + cell_h - 2, l) << "\n";
    for (int e = 0; e < E; ++e) {
      double v = r.w[size_t(l)][size_t(e)];
      s << fmt::format(R"s(<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>layer {} {}: {:.4f}</title></rect>)s",
                       col_x[size_t(e)], y, cell_w - 1, cell_h - 1, color(v / wmax), l, esc(b.experts[size_t(e)].name), v)
        << "\n";
    }
    for (int g = 0; g < G; ++g) {
      double v = r.a[size_t(l)][size_t(g)];
      s << fmt::format(R"s(<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>layer {} group {}: {:.4f}</title></rect>)s",
                       gx0 + g * gcell, y, gcell - 1, cell_h - 1, color(v), l, esc(b.groups[size_t(g)].name), v) << "\n";
    }
  }
  for (int g = 0; g < G; ++g)
    s << fmt::format(R"s(<text transform="translate({},{}) rotate(-60)" font-size="9">{}</text>)s", gx0 + g * gcell + gcell / 2 + 3,
                     top - 4, esc(b.groups[size_t(g)].name)) << "\n";
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
    s << fmt::format(R"s(<rect x="{}" y="{}" width="10" height="10" fill="{}"/>)s", left + i * 10, ly, color(i / 20.0)) << "\n";
  s << fmt::format(R"s(<text x="{}" y="{}">0</text><text x="{}" y="{}">{:.3f} (experts) / 1 (groups)</text>)s", left, ly + 22,
                   left + 200, ly + 22, wmax) << "\n";
  s << "</svg>\n";
  return s.str();
}

std::string fit_report_svg(const std::string& title, const std::vector<double>& train_acc,
                           const std::vector<double>& heldout_acc, const std::vector<double>& train_ce,
                           const std::vector<double>& heldout_ce) {
  const int L = int(train_acc.size());
  const int left = 70, top = 50, pw = std::max(300, std::min(900, 24 * L)), ph = 180, gap = 60;
  const int width = left + pw + 170, height = top + 2 * ph + gap + 50;
  double ce_max = 1e-9;
  for (const auto* v : {&train_ce, &heldout_ce})
    for (double x : *v)
      if (std::isfinite(x)) ce_max = std::max(ce_max, x);
  std::ostringstream s;
  s << fmt::format(R"s(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">)s", width, height)
    << "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  s << fmt::format(R"s(<text x="{}" y="22" font-size="14" font-weight="bold">{}</text>)s", left, esc(title)) << "\n";
  auto xat = [&](int l) { return left + (L > 1 ? double(l) * pw / (L - 1) : pw / 2.0); };
  auto panel = [&](int y0, const char* name, double ymax, const std::vector<double>& tr, const std::vector<double>& te,
                   const char* fmt_tick) {
    s << fmt::format(R"s(<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#999"/>)s", left, y0, pw, ph) << "\n";
    s << fmt::format(R"s(<text transform="translate({},{}) rotate(-90)" text-anchor="middle">{}</text>)s", left - 45,
                     y0 + ph / 2, name) << "\n";
    for (int k = 0; k <= 4; ++k) {
      const double v = ymax * k / 4, y = y0 + ph - ph * k / 4.0;
      s << fmt::format(R"s(<line x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}" stroke="#eee"/>)s", left, left + pw, y, y) << "\n";
      s << fmt::format(R"s(<text x="{}" y="{:.1f}" text-anchor="end">{}</text>)s", left - 4, y + 4,
                       fmt::format(fmt::runtime(fmt_tick), v)) << "\n";
    }
    auto line = [&](const std::vector<double>& v, const char* color, const char* dash, const char* label, int ly) {
      std::string pts;
      for (int l = 0; l < L; ++l)
        if (std::isfinite(v[size_t(l)]))
          pts += fmt::format("{:.1f},{:.1f} ", xat(l), y0 + ph - ph * std::clamp(v[size_t(l)] / ymax, 0.0, 1.0));
      if (pts.empty()) return;
      s << fmt::format(R"s(<polyline points="{}" fill="none" stroke="{}" stroke-width="2" stroke-dasharray="{}"/>)s", pts,
                       color, dash) << "\n";
      for (int l = 0; l < L; ++l)
        if (std::isfinite(v[size_t(l)]))
          s << fmt::format(R"s(<circle cx="{:.1f}" cy="{:.1f}" r="2.5" fill="{}"><title>layer {} {}: {:.4f}</title></circle>)s",
                           xat(l), y0 + ph - ph * std::clamp(v[size_t(l)] / ymax, 0.0, 1.0), color, l, label,
                           v[size_t(l)]) << "\n";
      s << fmt::format(R"s(<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{}" stroke-width="2" stroke-dasharray="{}"/><text x="{}" y="{}">{}</text>)s",
                       left + pw + 15, left + pw + 40, ly, ly, color, dash, left + pw + 45, ly + 4, label) << "\n";
    };
    line(tr, "#3b528b", "5,3", "train", y0 + 20);
    line(te, "#21918c", "none", "held out", y0 + 40);
  };
  panel(top, "group accuracy", 1.0, train_acc, heldout_acc, "{:.2f}");
  panel(top + ph + gap, "cross-entropy (nats)", ce_max, train_ce, heldout_ce, "{:.3g}");
  for (int l = 0; l < L; l += std::max(1, L / 15)) {
    s << fmt::format(R"s(<text x="{:.1f}" y="{}" text-anchor="middle">{}</text>)s", xat(l), top + ph + 15, l) << "\n";
    s << fmt::format(R"s(<text x="{:.1f}" y="{}" text-anchor="middle">{}</text>)s", xat(l), top + 2 * ph + gap + 15, l) << "\n";
  }
  s << fmt::format(R"s(<text x="{}" y="{}" text-anchor="middle">layer</text>)s", left + pw / 2, top + 2 * ph + gap + 35) << "\n";
  s << "</svg>\n";
  return s.str();
}

}  // namespace atmoe
