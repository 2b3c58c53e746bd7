// Software prefetch of a byte range into the caches, a line (64 bytes) at a time: all its
// lines in flight at once, for short runs that the hardware prefetcher would pick up late
// (a decode step's rank rows and expert descriptors, found cold after the base weights
// streamed by).
#pragma once
#include <cstddef>

namespace atmoe {

inline void prefetch_lines(const void* at, size_t bytes) {
  const char* c = static_cast<const char*>(at);
  for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

}  // namespace atmoe
