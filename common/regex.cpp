#include "common/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <map>
#include <memory>
#include <mutex>

#include "common/error.h"

namespace atmoe {

namespace {
struct Code {
  pcre2_code* code = nullptr;
  ~Code() {
    if (code) pcre2_code_free(code);
  }
};
std::mutex g_mu;
std::map<std::string, std::shared_ptr<Code>> g_cache;  // compiled patterns, by text

std::shared_ptr<Code> compile(const std::string& pattern, const std::string& what) {
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_cache.find(pattern);
  if (it != g_cache.end()) return it->second;
  int err = 0;
  PCRE2_SIZE off = 0;
  auto c = std::make_shared<Code>();
  c->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(),
                          PCRE2_UTF | PCRE2_ANCHORED | PCRE2_ENDANCHORED, &err, &off, nullptr);
  if (!c->code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    ATMOE_INPUT_ERROR("{} '{}' is not a valid regular expression (at offset {}: {})", what, pattern, off,
                      reinterpret_cast<const char*>(msg));
  }
  g_cache[pattern] = c;
  return c;
}
}  // namespace

bool regex_full_match(const std::string& pattern, const std::string& subject, std::vector<std::string>* captures,
                      const std::string& what) {
  auto c = compile(pattern, what);
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(c->code, nullptr);
  int rc = pcre2_match(c->code, reinterpret_cast<PCRE2_SPTR>(subject.data()), subject.size(), 0, 0, md, nullptr);
  if (rc > 0 && captures) {
    captures->clear();
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    for (int i = 1; i < rc; ++i)
      captures->push_back(ov[2 * i] == PCRE2_UNSET ? std::string() : subject.substr(ov[2 * i], ov[2 * i + 1] - ov[2 * i]));
  }
  pcre2_match_data_free(md);
  return rc > 0;
}

}  // namespace atmoe
