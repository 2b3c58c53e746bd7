// Helpers for fuzz targets whose parser reads files from a directory (tokenizer.json,
// atmoe.json, adapter directories): one scratch directory per process, created on first
// use under $ATMOE_FUZZ_TMP (default /dev/shm, a RAM disk) and removed at normal exit;
// each input overwrites the files in it.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

namespace atmoe::fuzz {

inline const std::string& scratch_dir() {
  // Never destroyed: the atexit hook below runs after static destructors may have run.
  static const std::string* dir = [] {
    const char* parent = std::getenv("ATMOE_FUZZ_TMP");
    auto* d = new std::string(std::string(parent && *parent ? parent : "/dev/shm") + "/atmoe_fuzz_XXXXXX");
    if (!mkdtemp(d->data())) {
      std::perror("fuzz: mkdtemp");
      std::abort();
    }
    return d;
  }();
  static const bool hooked = [] {
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(*dir, ec);
    });
    return true;
  }();
  (void)hooked;
  return *dir;
}

// Writes `size` bytes to `path` (replacing it); aborts on an I/O error, which would be a
// problem of the harness, not of the parser.
inline void put_file(const std::string& path, const void* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || (size && std::fwrite(data, 1, size, f) != size) || std::fclose(f) != 0) {
    std::perror(("fuzz: write " + path).c_str());
    std::abort();
  }
}
inline void put_file(const std::string& path, const std::string& s) {
  put_file(path, s.data(), s.size());
}

// ATMOE_FUZZ_VERBOSE=1: print what each input did (to check that a seed reaches the part
// of the loader it was written for); silent otherwise.
inline void report(const char* outcome) {
  static const bool verbose = [] {
    const char* v = std::getenv("ATMOE_FUZZ_VERBOSE");
    return v && *v && *v != '0';
  }();
  if (verbose) std::fprintf(stderr, "fuzz: %s\n", outcome);
}

inline void make_dirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) {
    std::fprintf(stderr, "fuzz: mkdir %s: %s\n", path.c_str(), ec.message().c_str());
    std::abort();
  }
}

}  // namespace atmoe::fuzz
