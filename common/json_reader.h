// Reading the JSON files a user writes (atmoe.json, adapter_config.json, config.json,
// tokenizer.json, ...): every value is read through a JsonAt, which knows the file and the
// field path from the root ("groups[1].experts[0].name") and turns a wrong type, a missing
// field, an out-of-range number or an unknown key into one InputError line:
//   "FILE: FIELD: expected an integer in 1..4096, got 1e+30"
// Integers are range-checked before narrowing; a number written with a fraction or an
// exponent is not an integer; numbers are finite.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <string>

namespace atmoe {

// Parses a regular file of at most max_bytes; InputError naming the file otherwise.
nlohmann::json read_json_file(const std::string& path, const std::string& what, size_t max_bytes = size_t(256) << 20);
// Parses [begin, end) as JSON; a key given twice in one object (nlohmann would keep the last
// silently) is returned in *dup (the first such key; empty when none). Throws
// nlohmann::json::exception on a syntax error.
nlohmann::json parse_json_unique_keys(const char* begin, const char* end, std::string* dup);

class JsonAt {
 public:
  JsonAt(const nlohmann::json& v, std::string file, std::string field = "");

  const nlohmann::json& value() const { return *v_; }
  const std::string& file() const { return file_; }
  const std::string& field() const { return field_; }
  bool is_null() const { return v_->is_null(); }

  // Children. [key] requires an object holding the key; at(i) an array.
  bool has(const char* key) const;  // an object with `key` present and not null
  JsonAt operator[](const std::string& key) const;
  JsonAt at(size_t i) const;
  size_t size() const;  // of an array or an object

  // This value as a given type (InputError naming the field otherwise).
  const nlohmann::json& object() const;
  const nlohmann::json& array() const;
  std::string str() const;
  int64_t integer(int64_t lo, int64_t hi) const;
  double number(double lo, double hi) const;
  bool boolean() const;

  // Optional fields of an object: `def` when absent or null.
  std::string str_or(const char* key, const std::string& def) const;
  int64_t int_or(const char* key, int64_t def, int64_t lo, int64_t hi) const;
  double num_or(const char* key, double def, double lo, double hi) const;
  bool bool_or(const char* key, bool def) const;

  // A closed schema: InputError naming the first key of this object not in `known`.
  void only_keys(std::initializer_list<const char*> known) const;

  [[noreturn]] void fail(const std::string& problem) const;  // "FILE: FIELD: problem"
  std::string child(const std::string& key) const;           // field path of a child

 private:
  const nlohmann::json* v_;
  std::string file_, field_;
};

// "a string \"abc\"", "the number 1e+30", "an object", ... for messages.
std::string json_describe(const nlohmann::json& v);

}  // namespace atmoe
