#include "common/utf8.h"

namespace atmoe {

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xc0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xe0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3f)));
    out.push_back(char(0x80 | (cp & 0x3f)));
  } else {
    out.push_back(char(0xf0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3f)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3f)));
    out.push_back(char(0x80 | (cp & 0x3f)));
  }
}

static size_t seq_len(uint8_t c) {
  if (c < 0x80) return 1;
  if ((c & 0xe0) == 0xc0) return 2;
  if ((c & 0xf0) == 0xe0) return 3;
  if ((c & 0xf8) == 0xf0) return 4;
  return 0;  // continuation or invalid lead byte
}

std::vector<std::string> utf8_chars(const std::string& s) {
  std::vector<std::string> r;
  size_t i = 0;
  while (i < s.size()) {
    size_t n = seq_len(uint8_t(s[i]));
    bool ok = n > 0 && i + n <= s.size();
    for (size_t k = 1; ok && k < n; ++k) ok = (uint8_t(s[i + k]) & 0xc0) == 0x80;
    if (!ok) n = 1;
    r.push_back(s.substr(i, n));
    i += n;
  }
  return r;
}

size_t utf8_complete_prefix(const std::string& s) {
  // Look back at most 3 bytes for a lead byte whose sequence is not finished yet.
  size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    uint8_t c = uint8_t(s[n - back]);
    if ((c & 0xc0) == 0x80) continue;  // continuation: keep looking for the lead
    size_t need = seq_len(c);
    if (need > back) return n - back;  // incomplete sequence at the end
    return n;
  }
  return n;
}

}  // namespace atmoe
