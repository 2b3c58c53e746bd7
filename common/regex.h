// Full-string regular-expression matching on PCRE2 (UTF mode), for the adapter loaders
// (PEFT's target_modules / rank_pattern rules and checkpoint key layouts). InputError
// naming `what` when a user-supplied pattern does not compile.
#pragma once
#include <string>
#include <vector>

namespace atmoe {

// True when `pattern` matches the whole of `subject`; captures (group 1..n) when asked.
bool regex_full_match(const std::string& pattern, const std::string& subject, std::vector<std::string>* captures = nullptr,
                      const std::string& what = "pattern");

}  // namespace atmoe
