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

// Length of the well-formed sequence starting at s[i] (Unicode Table 3-7), 0 if none.
static size_t valid_len(const std::string& s, size_t i) {
  const size_t n = s.size() - i;
  const auto b = [&](size_t k) { return uint8_t(s[i + k]); };
  const auto cont = [&](size_t k, uint8_t lo, uint8_t hi) { return k < n && b(k) >= lo && b(k) <= hi; };
  const uint8_t c = b(0);
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) return cont(1, 0x80, 0xbf) ? 2 : 0;
  if (c >= 0xe0 && c <= 0xef) {
    const uint8_t lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
    return cont(1, lo, hi) && cont(2, 0x80, 0xbf) ? 3 : 0;
  }
  if (c >= 0xf0 && c <= 0xf4) {
    const uint8_t lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
    return cont(1, lo, hi) && cont(2, 0x80, 0xbf) && cont(3, 0x80, 0xbf) ? 4 : 0;
  }
  return 0;
}

std::string utf8_sanitize(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t n = valid_len(s, i);
    if (n) {
      out.append(s, i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD
      ++i;
    }
  }
  return out;
}

size_t utf8_control_len(const std::string& s, size_t i) {
  const uint8_t c = uint8_t(s[i]), n1 = i + 1 < s.size() ? uint8_t(s[i + 1]) : 0, n2 = i + 2 < s.size() ? uint8_t(s[i + 2]) : 0;
  if (c < 0x20 || c == 0x7f) return 1;
  if (c == 0xc2 && n1 >= 0x80 && n1 <= 0x9f) return 2;
  if (c == 0xe2 && n1 == 0x80 && (n2 == 0xa8 || n2 == 0xa9)) return 3;
  return 0;
}

}  // namespace atmoe
