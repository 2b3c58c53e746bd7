#include "coordinator/fit_report_svg.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include <fmt/format.h>

#include "coordinator/svg.h"

namespace atmoe {

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
  s << fmt::format(R"s(<text x="{}" y="22" font-size="14" font-weight="bold">{}</text>)s", left, svg_escape(title)) << "\n";
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
