#include "common/json_reader.h"

#include <cmath>
#include <set>
#include <vector>

#include "common/error.h"
#include "common/files.h"

namespace atmoe {
using json = nlohmann::json;

json parse_json_unique_keys(const char* begin, const char* end, std::string* dup) {
  // The keys of each open object are tracked on a stack while parsing.
  std::vector<std::set<std::string>> open;
  dup->clear();
  const json::parser_callback_t track = [&](int, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::object_start)
      open.emplace_back();
    else if (ev == json::parse_event_t::object_end && !open.empty())
      open.pop_back();
    else if (ev == json::parse_event_t::key && !open.empty() && !open.back().insert(parsed.get<std::string>()).second &&
             dup->empty())
      *dup = parsed.get<std::string>();
    return true;
  };
  return json::parse(begin, end, track);
}

json read_json_file(const std::string& path, const std::string& what, size_t max_bytes) {
  const std::string text = read_file(path, what, max_bytes);
  std::string dup;
  try {
    json j = parse_json_unique_keys(text.data(), text.data() + text.size(), &dup);
    ATMOE_CHECK_INPUT(dup.empty(), "{}: key \"{}\" appears twice in one object", path, dup.substr(0, 80));
    return j;
  } catch (const json::exception& e) {
    // nlohmann's message: "[json.exception.parse_error.101] parse error at line 1, column 5: ..."
    std::string m = e.what();
    const size_t k = m.find("] ");
    ATMOE_INPUT_ERROR("{}: not valid JSON ({})", path, k == std::string::npos ? m : m.substr(k + 2));
  }
}

std::string json_describe(const json& v) {
  // Containers are never dumped: dump() recurses, and a deeply nested file would overflow the stack.
  if (v.is_object()) return "an object";
  if (v.is_array()) return "a list";
  if (v.is_null()) return "null";
  std::string d = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (d.size() > 40) d = d.substr(0, 37) + "...";
  if (v.is_string()) return "the string " + d;
  if (v.is_boolean()) return d;
  return "the number " + d;
}

JsonAt::JsonAt(const json& v, std::string file, std::string field)
    : v_(&v), file_(std::move(file)), field_(std::move(field)) {}

void JsonAt::fail(const std::string& problem) const {
  if (field_.empty()) ATMOE_INPUT_ERROR("{}: {}", file_, problem);
  ATMOE_INPUT_ERROR("{}: {}: {}", file_, field_, problem);
}

std::string JsonAt::child(const std::string& key) const {
  return field_.empty() ? key : field_ + "." + key;
}

bool JsonAt::has(const char* key) const {
  return v_->is_object() && v_->contains(key) && !(*v_)[key].is_null();
}

JsonAt JsonAt::operator[](const std::string& key) const {
  object();
  auto it = v_->find(key);
  if (it == v_->end()) JsonAt(*v_, file_, child(key)).fail("missing field");
  return JsonAt(*it, file_, child(key));
}

JsonAt JsonAt::at(size_t i) const {
  array();
  ATMOE_ASSERT(i < v_->size());
  return JsonAt((*v_)[i], file_, field_ + "[" + std::to_string(i) + "]");
}

size_t JsonAt::size() const {
  if (!v_->is_array() && !v_->is_object()) fail("expected a list or an object, got " + json_describe(*v_));
  return v_->size();
}

const json& JsonAt::object() const {
  if (!v_->is_object()) fail("expected an object, got " + json_describe(*v_));
  return *v_;
}

const json& JsonAt::array() const {
  if (!v_->is_array()) fail("expected a list, got " + json_describe(*v_));
  return *v_;
}

std::string JsonAt::str() const {
  if (!v_->is_string()) fail("expected a string, got " + json_describe(*v_));
  return v_->get<std::string>();
}

int64_t JsonAt::integer(int64_t lo, int64_t hi) const {
  const std::string want = fmt::format("expected an integer in {}..{}", lo, hi);
  if (!v_->is_number_integer()) fail(want + ", got " + json_describe(*v_));
  if (v_->is_number_unsigned()) {
    const uint64_t u = v_->get<uint64_t>();
    if (hi < 0 || u > uint64_t(hi) || (lo > 0 && u < uint64_t(lo))) fail(want + ", got " + v_->dump());
    return int64_t(u);
  }
  const int64_t x = v_->get<int64_t>();
  if (x < lo || x > hi) fail(want + ", got " + v_->dump());
  return x;
}

double JsonAt::number(double lo, double hi) const {
  const std::string want = fmt::format("expected a number in [{}, {}]", lo, hi);
  if (!v_->is_number()) fail(want + ", got " + json_describe(*v_));
  const double x = v_->get<double>();
  if (!std::isfinite(x) || x < lo || x > hi) fail(want + ", got " + v_->dump());
  return x;
}

bool JsonAt::boolean() const {
  if (!v_->is_boolean()) fail("expected true or false, got " + json_describe(*v_));
  return v_->get<bool>();
}

std::string JsonAt::str_or(const char* key, const std::string& def) const {
  return has(key) ? (*this)[key].str() : def;
}
int64_t JsonAt::int_or(const char* key, int64_t def, int64_t lo, int64_t hi) const {
  return has(key) ? (*this)[key].integer(lo, hi) : def;
}
double JsonAt::num_or(const char* key, double def, double lo, double hi) const {
  return has(key) ? (*this)[key].number(lo, hi) : def;
}
bool JsonAt::bool_or(const char* key, bool def) const {
  return has(key) ? (*this)[key].boolean() : def;
}

void JsonAt::only_keys(std::initializer_list<const char*> known) const {
  for (auto it = object().begin(); it != v_->end(); ++it) {
    bool ok = false;
    for (const char* k : known) ok = ok || it.key() == k;
    if (ok) continue;
    std::string list;
    for (const char* k : known) list += std::string(list.empty() ? "" : ", ") + k;
    JsonAt(it.value(), file_, child(it.key())).fail("unknown field (expected one of: " + list + ")");
  }
}

}  // namespace atmoe
