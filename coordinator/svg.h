// Small helpers shared by atmoe's SVG pictures (explain's heatmap, fit-router's report).
#pragma once
#include <algorithm>
#include <cmath>
#include <string>

#include <fmt/format.h>

namespace atmoe {

// A perceptually ordered ramp (viridis endpoints and midpoints), t in [0, 1].
inline std::string svg_color(double t) {
  static const double stops[][3] = {{68, 1, 84},    {59, 82, 139},  {33, 145, 140},
                                    {94, 201, 98},  {253, 231, 37}};
  t = (std::isnan(t) ? 0.0 : std::clamp(t, 0.0, 1.0)) * 4.0;  // NaN would index past the stops
  int i = std::min(3, int(t));
  double f = t - i;
  int c[3];
  for (int k = 0; k < 3; ++k) c[k] = int(std::lround(stops[i][k] + f * (stops[i + 1][k] - stops[i][k])));
  return fmt::format("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
}

inline std::string svg_escape(const std::string& s) {
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

}  // namespace atmoe
