// AT-MoE routing against an independent float64 transcription of DESIGN.md 1.1, on fresh
// random bundles, logits and controls (masks, pins, group bias, top-k, temperatures down
// to 0, one-expert groups, fully masked groups), plus the validation of bad controls.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/error.h"
#include "coordinator/router.h"
#include "coordinator/svg.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {

Bundle random_bundle(std::mt19937_64& rng) {
  Bundle b;
  int G = 1 + int(rng() % 5);
  for (int g = 0; g < G; ++g) {
    BundleGroup bg;
    bg.name = "g" + std::to_string(g);
    int n = 1 + int(rng() % 4);
    for (int i = 0; i < n; ++i) {
      bg.experts.push_back(int(b.experts.size()));
      b.experts.push_back({bg.name + "e" + std::to_string(i), "", g});
    }
    b.groups.push_back(bg);
  }
  return b;
}

// softmax over the kept entries of z / tau; tau == 0 -> one-hot at the first maximum.
std::vector<double> ref_softmax(const std::vector<double>& z, const std::vector<bool>& keep, double tau) {
  std::vector<double> p(z.size(), 0.0);
  int arg = -1;
  for (size_t i = 0; i < z.size(); ++i)
    if (keep[i] && (arg < 0 || z[i] > z[size_t(arg)])) arg = int(i);
  if (arg < 0) return p;
  if (tau == 0) {
    p[size_t(arg)] = 1;
    return p;
  }
  double den = 0;
  for (size_t i = 0; i < z.size(); ++i)
    if (keep[i]) den += std::exp((z[i] - z[size_t(arg)]) / tau);
  for (size_t i = 0; i < z.size(); ++i)
    if (keep[i]) p[i] = std::exp((z[i] - z[size_t(arg)]) / tau) / den;
  return p;
}

void ref_route(const Bundle& b, const std::vector<double>& gl, const std::vector<double>& el, const RoutingControls& c,
               std::vector<double>& a, std::vector<double>& w) {
  const size_t G = b.groups.size(), E = b.experts.size();
  a.assign(G, 0);
  w.assign(E, 0);
  if (c.off) return;
  if (!c.adapter.empty()) {
    int e = b.expert_index(c.adapter);
    w[size_t(e)] = 1;
    a[size_t(b.experts[size_t(e)].group)] = 1;
    return;
  }
  std::vector<bool> emask(E, false), gmask(G, false);
  for (auto& n : c.mask) {
    for (size_t e = 0; e < E; ++e)
      if (b.experts[e].name == n) emask[e] = true;
    for (size_t g = 0; g < G; ++g)
      if (b.groups[g].name == n) gmask[g] = true;
  }
  for (size_t g = 0; g < G; ++g) {
    bool all = std::all_of(b.groups[g].experts.begin(), b.groups[g].experts.end(), [&](int e) { return emask[size_t(e)]; });
    if (all || gmask[g]) {
      gmask[g] = true;
      for (int e : b.groups[g].experts) emask[size_t(e)] = true;
    }
  }
  std::vector<double> pe(E, 0.0);  // pinned experts' weights
  std::vector<bool> fixed(G, false);
  if (!c.pin.empty()) {
    // A group's pin is the sum of its pins, then normalised: groups pinned to equal totals
    // (3 by name; 2 + 1 through experts) tie exactly, and top-k keeps the lower index.
    double s = 0;
    for (auto& [n, v] : c.pin) s += v;
    for (auto& [n, v] : c.pin) {
      const int g = b.group_index(n);
      if (g >= 0) {
        a[size_t(g)] += v;
      } else {
        const int e = b.expert_index(n), ge = b.experts[size_t(e)].group;
        a[size_t(ge)] += v;
        pe[size_t(e)] = v;
        fixed[size_t(ge)] = fixed[size_t(ge)] || v > 0;
      }
    }
    for (auto& v : a) v /= s;
  } else {
    std::vector<double> z(G);
    std::vector<bool> keep(G);
    for (size_t g = 0; g < G; ++g) {
      z[g] = gl[g] + (c.group_bias.count(b.groups[g].name) ? c.group_bias.at(b.groups[g].name) : 0.0);
      keep[g] = !gmask[g];
    }
    a = ref_softmax(z, keep, c.tau_group.value_or(b.tau_group));
  }
  if (c.top_k_groups > 0 && size_t(c.top_k_groups) < G) {
    std::vector<size_t> idx(G);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](size_t i, size_t j) { return a[i] > a[j]; });
    for (size_t k = size_t(c.top_k_groups); k < G; ++k) a[idx[k]] = 0;
    double s = std::accumulate(a.begin(), a.end(), 0.0);
    for (auto& v : a) v /= s;
  }
  for (size_t g = 0; g < G; ++g) {
    std::vector<double> z;
    std::vector<bool> keep;
    for (int e : b.groups[g].experts) {
      z.push_back(el[size_t(e)]);
      keep.push_back(!emask[size_t(e)]);
    }
    auto p = ref_softmax(z, keep, c.tau_expert.value_or(b.tau_expert));
    if (fixed[g]) {
      double zs = 0;
      for (int e : b.groups[g].experts) zs += pe[size_t(e)];
      for (size_t i = 0; i < p.size(); ++i) p[i] = pe[size_t(b.groups[g].experts[i])] / zs;
    }
    for (size_t i = 0; i < p.size(); ++i) w[size_t(b.groups[g].experts[i])] = a[g] * p[i];
  }
}

TEST(Router, MatchesFloat64ReferenceOnRandomControls) {
  std::mt19937_64 rng(test_seed() + 50);
  const double taus[] = {0.0, 1e-3, 0.5, 1.0, 3.0};
  int checked = 0;
  for (int it = 0; it < 3000; ++it) {
    Bundle b = random_bundle(rng);
    const size_t G = b.groups.size(), E = b.experts.size();
    std::vector<double> gl(G), el(E);
    std::normal_distribution<double> nd(0, 2);
    for (auto& x : gl) x = nd(rng);
    for (auto& x : el) x = nd(rng);
    if (rng() % 5 == 0) el[0] = el[E - 1], gl[0] = gl[G - 1];  // ties
    RoutingControls c;
    if (rng() % 3 == 0)
      for (size_t e = 0; e < E; ++e)
        if (rng() % 3 == 0) c.mask.push_back(b.experts[e].name);
    if (rng() % 4 == 0) c.mask.push_back(b.groups[rng() % G].name);
    if (rng() % 4 == 0)
      for (size_t g = 0; g < G; ++g) c.group_bias[b.groups[g].name] = nd(rng);
    if (rng() % 3 == 0) c.top_k_groups = int(1 + rng() % G);
    if (rng() % 2 == 0) c.tau_group = taus[rng() % 5];
    if (rng() % 2 == 0) c.tau_expert = taus[rng() % 5];
    if (rng() % 5 == 0) {
      for (size_t g = 0; g < G; ++g) {
        if (rng() % 2) {
          c.pin[b.groups[g].name] = double(rng() % 4);
        } else if (rng() % 2) {  // through its experts
          for (int e : b.groups[g].experts)
            if (rng() % 2) c.pin[b.experts[size_t(e)].name] = double(rng() % 4);
        }
      }
    }
    if (rng() % 15 == 0) c.adapter = b.experts[rng() % E].name;
    if (rng() % 20 == 0) c.off = true;
    ResolvedRouting r;
    try {
      r = resolve_routing(b, c);
    } catch (const InputError&) {
      continue;  // e.g. everything masked, or pinned and masked: checked in BadControls
    }
    std::vector<double> a(G), w(E), ra, rw;
    route_from_logits(b, gl.data(), el.data(), r, a.data(), w.data());
    ref_route(b, gl, el, c, ra, rw);
    for (size_t g = 0; g < G; ++g) ASSERT_NEAR(a[g], ra[g], 1e-12) << "iteration " << it << " group " << g;
    for (size_t e = 0; e < E; ++e) ASSERT_NEAR(w[e], rw[e], 1e-12) << "iteration " << it << " expert " << e;
    if (!c.off) {
      double s = std::accumulate(w.begin(), w.end(), 0.0);
      ASSERT_NEAR(s, 1.0, 1e-9) << "iteration " << it;
      ASSERT_NEAR(std::accumulate(a.begin(), a.end(), 0.0), 1.0, 1e-9);
    }
    ++checked;
  }
  EXPECT_GT(checked, 2000);
}

TEST(Router, EdgeCases) {
  Bundle b;
  b.groups = {{"med", {0, 1}}, {"law", {2}}};
  b.experts = {{"cardio", "", 0}, {"onco", "", 0}, {"contracts", "", 1}};
  double gl[] = {1.0, 0.5}, el[] = {2.0, 1.0, 7.0};
  std::vector<double> a(2), w(3);
  auto run = [&](RoutingControls c) {
    route_from_logits(b, gl, el, resolve_routing(b, c), a.data(), w.data());
  };
  RoutingControls c;
  c.tau_group = 0;  // argmax group
  run(c);
  EXPECT_EQ(a[0], 1.0);
  EXPECT_EQ(w[2], 0.0);
  c = {};
  c.mask = {"med"};  // fully masked group: all weight to law, its only expert
  run(c);
  EXPECT_EQ(w[2], 1.0);
  c = {};
  c.mask = {"cardio", "onco"};  // a group whose experts are all masked is masked
  run(c);
  EXPECT_EQ(a[0], 0.0);
  EXPECT_EQ(w[2], 1.0);
  c = {};
  c.pin = {{"med", 3}, {"law", 1}};
  c.tau_expert = 0;
  run(c);
  EXPECT_DOUBLE_EQ(a[0], 0.75);
  EXPECT_DOUBLE_EQ(w[0], 0.75);  // argmax inside med
  EXPECT_DOUBLE_EQ(w[2], 0.25);  // one expert per group takes the whole group weight
  // Pins whose sum overflows a double: only their ratios count (their sum used to be inf and
  // the weights NaN), through group names and through experts, and the smallest normals.
  c = {};
  c.pin = {{"med", 1e308}, {"law", 1e308}};
  run(c);
  EXPECT_DOUBLE_EQ(a[0], 0.5);
  EXPECT_DOUBLE_EQ(a[1], 0.5);
  EXPECT_DOUBLE_EQ(w[2], 0.5);
  c = {};
  c.pin = {{"cardio", 1.5e308}, {"onco", 1.5e308}, {"law", 1e308}};
  run(c);
  EXPECT_DOUBLE_EQ(a[0], 0.75);
  EXPECT_DOUBLE_EQ(w[0], 0.375);
  EXPECT_DOUBLE_EQ(w[1], 0.375);
  EXPECT_DOUBLE_EQ(w[2], 0.25);
  c = {};
  c.pin = {{"med", 3e-320}, {"law", 1e-320}};
  run(c);
  EXPECT_NEAR(a[0], 0.75, 1e-3);  // subnormals: their ratio to a few digits
  c = {};
  c.top_k_groups = 1;
  run(c);
  EXPECT_EQ(a[1], 0.0);
  EXPECT_DOUBLE_EQ(a[0], 1.0);
  c = {};
  c.adapter = "onco";
  run(c);
  EXPECT_EQ(w[1], 1.0);
  c = {};
  c.off = true;
  run(c);
  EXPECT_EQ(w[0] + w[1] + w[2], 0.0);
}

// The heatmaps' colour of a NaN weight is the low end of the scale, not an index past it.
TEST(Router, SvgColourOfNonFiniteWeights) {
  EXPECT_EQ(svg_color(std::nan("")), svg_color(0.0));
  EXPECT_EQ(svg_color(INFINITY), svg_color(1.0));
  EXPECT_EQ(svg_color(-INFINITY), svg_color(0.0));
  EXPECT_NE(svg_color(0.0), svg_color(1.0));
}

TEST(Router, BadControlsAreInputErrors) {
  Bundle b;
  b.groups = {{"med", {0}}, {"law", {1}}};
  b.experts = {{"cardio", "", 0}, {"contracts", "", 1}};
  auto bad = [&](RoutingControls c) { EXPECT_THROW(resolve_routing(b, c), InputError); };
  RoutingControls c;
  c.mask = {"nope"};
  bad(c);
  c = {};
  c.pin = {{"nope", 1}};
  bad(c);
  c = {};
  c.pin = {{"med", 0}};
  bad(c);
  c = {};
  c.pin = {{"med", -1}, {"law", 2}};
  bad(c);
  c = {};
  c.pin = {{"med", 1}, {"cardio", 1}};  // one group pinned both ways
  bad(c);
  c = {};
  c.pin = {{"cardio", 1}};
  c.mask = {"cardio"};
  bad(c);
  c = {};
  c.tau_group = -1;
  bad(c);
  c = {};
  c.tau_expert = -0.5;
  bad(c);
  c = {};
  c.top_k_groups = 3;
  bad(c);
  c = {};
  c.top_k_groups = -1;
  bad(c);
  c = {};
  c.mask = {"med", "law"};
  bad(c);
  c = {};
  c.adapter = "nope";
  bad(c);
  c = {};
  c.lambda = 1.5;
  bad(c);
  c = {};
  c.group_bias = {{"nope", 1}};
  bad(c);
  c = {};
  c.pin = {{"med", 1}};
  c.mask = {"med"};
  bad(c);
}

}  // namespace
}  // namespace atmoe::test
