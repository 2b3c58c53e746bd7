// UTF-8 helpers shared by the tokenizer and the streaming detokeniser.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace atmoe {

void utf8_append(std::string& out, uint32_t cp);
// Splits into code-point substrings; an invalid byte becomes its own 1-byte piece.
std::vector<std::string> utf8_chars(const std::string& s);
// Length of the longest prefix of s that does not end inside a UTF-8 sequence that could
// still be completed by more bytes. Invalid bytes count as complete (they never will be).
size_t utf8_complete_prefix(const std::string& s);
// s with every byte that does not belong to a well-formed UTF-8 sequence (stray
// continuation bytes, overlong forms, surrogates, code points past U+10FFFF, truncated
// sequences) replaced by U+FFFD: the result is always valid UTF-8.
std::string utf8_sanitize(const std::string& s);
// Bytes of the control character at s[i] — C0 (U+0000..U+001F), DEL, C1 (U+0080..U+009F) or
// the line/paragraph separators U+2028/U+2029, which end a line for many readers — or 0.
size_t utf8_control_len(const std::string& s, size_t i);

}  // namespace atmoe
