#include "coordinator/placement.h"

#include <algorithm>
#include <filesystem>
#include <numeric>
#include <set>

#include "common/error.h"
#include "common/files.h"
#include "common/json_reader.h"

namespace atmoe {
namespace fs = std::filesystem;

int64_t expert_file_bytes(const BundleExpert& e) {
  std::error_code ec;
  const auto n = fs::file_size(fs::path(e.adapter_dir) / "adapter_model.safetensors", ec);
  return ec ? 0 : int64_t(n);
}

namespace {
// Units: groups 0..G-1, then the general expert as G.
std::vector<int64_t> unit_bytes(const Bundle& b) {
  std::vector<int64_t> u;
  for (const auto& g : b.groups) {
    int64_t s = 0;
    for (int e : g.experts) s += expert_file_bytes(b.experts[size_t(e)]);
    u.push_back(s);
  }
  if (b.general) u.push_back(expert_file_bytes(*b.general));
  return u;
}

void finish(const Bundle& b, Placement& p, const std::vector<int64_t>& ub) {
  p.bytes.assign(p.groups.size(), 0);
  for (size_t w = 0; w < p.groups.size(); ++w) {
    std::sort(p.groups[w].begin(), p.groups[w].end());
    for (int g : p.groups[w]) p.bytes[w] += ub[size_t(g)];
  }
  if (p.general_worker >= 0) p.bytes[size_t(p.general_worker)] += ub[b.groups.size()];
}
}  // namespace

Placement plan_placement(const Bundle& b, int n_workers) {
  const int units = int(b.groups.size()) + (b.general ? 1 : 0);
  ATMOE_CHECK_INPUT(n_workers >= 1, "placement: no worker ranks");
  ATMOE_CHECK_INPUT(n_workers <= units,
                    "{} worker ranks but {} has {} groups{}: a worker holds whole groups, so run at most {} ranks "
                    "(1 coordinator + {} workers)",
                    n_workers, b.manifest, b.groups.size(), b.general ? " + a general expert" : "", units + 1, units);
  const auto ub = unit_bytes(b);
  std::vector<int> order(static_cast<size_t>(units));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return ub[size_t(x)] > ub[size_t(y)]; });
  Placement p;
  p.groups.assign(size_t(n_workers), {});
  std::vector<int64_t> load(size_t(n_workers), 0);
  std::vector<int> count(size_t(n_workers), 0);
  for (size_t i = 0; i < order.size(); ++i) {
    // Every worker gets one unit first (no idle rank), then the lightest takes the next.
    int w = 0;
    if (i < size_t(n_workers)) {
      w = int(i);
    } else {
      for (int k = 1; k < n_workers; ++k)
        if (load[size_t(k)] < load[size_t(w)]) w = k;
    }
    load[size_t(w)] += ub[size_t(order[i])];
    ++count[size_t(w)];
    if (order[i] == int(b.groups.size()))
      p.general_worker = w;
    else
      p.groups[size_t(w)].push_back(order[i]);
  }
  finish(b, p, ub);
  return p;
}

Placement read_placement(const std::string& path, const Bundle& b, int n_workers, const char* flag) {
  const auto j = read_json_file(path, flag, size_t(64) << 20);
  JsonAt root(j, path);
  (void)root.object();
  const int units = int(b.groups.size()) + (b.general ? 1 : 0);
  ATMOE_CHECK_INPUT(n_workers <= units, "{}: {} worker ranks but the bundle has only {} groups{}: run at most {} ranks",
                    path, n_workers, b.groups.size(), b.general ? " + a general expert" : "", units + 1);
  Placement p;
  p.groups.assign(size_t(n_workers), {});
  std::vector<std::string> owner(static_cast<size_t>(units));
  std::set<int> seen_ranks;
  for (const auto& [key, val] : j.items()) {
    int rank = -1;
    const bool numeric = !key.empty() && key.size() <= 6 &&
                         std::all_of(key.begin(), key.end(), [](unsigned char ch) { return ch >= '0' && ch <= '9'; });
    if (numeric) rank = std::stoi(key);
    ATMOE_CHECK_INPUT(numeric && rank >= 1 && rank <= n_workers,
                      "{}: key \"{}\": expected a worker rank 1..{} (this job has {} ranks; rank 0 is the coordinator)",
                      path, key, n_workers, n_workers + 1);
    seen_ranks.insert(rank);
    JsonAt list = root[key];
    (void)list.array();
    ATMOE_CHECK_INPUT(list.size() > 0, "{}: \"{}\": an empty list (every worker holds at least one group)", path, key);
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string name = list.at(i).str();
      int u = b.group_index(name);
      if (u < 0 && b.general && name == b.general->name) u = int(b.groups.size());
      if (u < 0) list.at(i).fail(fmt::format("\"{}\" is not a group of {} (nor its general expert)", name, b.manifest));
      if (!owner[size_t(u)].empty())
        list.at(i).fail(
            fmt::format("\"{}\" is already placed on rank {}: a group lives on one worker", name, owner[size_t(u)]));
      owner[size_t(u)] = key;
      if (u == int(b.groups.size()))
        p.general_worker = rank - 1;
      else
        p.groups[size_t(rank - 1)].push_back(u);
    }
  }
  for (int r = 1; r <= n_workers; ++r)
    ATMOE_CHECK_INPUT(seen_ranks.count(r),
                      "{}: worker rank {} has no groups: give every rank 1..{} at least one, or run fewer ranks", path,
                      r, n_workers);
  for (int u = 0; u < units; ++u)
    ATMOE_CHECK_INPUT(!owner[size_t(u)].empty(), "{}: {} \"{}\" is not placed on any worker", path,
                      u < int(b.groups.size()) ? "group" : "general expert",
                      u < int(b.groups.size()) ? b.groups[size_t(u)].name : b.general->name);
  finish(b, p, unit_bytes(b));
  return p;
}

std::string describe_placement(const Bundle& b, const Placement& p) {
  std::string s =
      fmt::format("placement over {} ranks: rank 0 coordinator (base model, router; no experts)\n", p.n_workers() + 1);
  for (int w = 0; w < p.n_workers(); ++w) {
    std::string names;
    int experts = 0;
    for (int g : p.groups[size_t(w)]) {
      names += (names.empty() ? "" : ", ") + b.groups[size_t(g)].name;
      experts += int(b.groups[size_t(g)].experts.size());
    }
    if (p.general_worker == w) {
      names += (names.empty() ? "" : ", ") + ("general expert " + b.general->name);
      ++experts;
    }
    s += fmt::format("  rank {:<3} {:>4} groups {:>5} experts {:>10.2f} MiB   {}\n", w + 1, p.groups[size_t(w)].size(),
                     experts, double(p.bytes[size_t(w)]) / (1 << 20), names);
  }
  return s;
}

}  // namespace atmoe
