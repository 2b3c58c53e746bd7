#include "common/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "common/error.h"

namespace atmoe {
namespace fs = std::filesystem;

PathKind path_kind(const std::string& path, const std::string& what) {
  ATMOE_CHECK_INPUT(!path.empty(), "{}: empty path", what);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT) {
      // A dangling symlink is missing too, but say so.
      struct stat lst {};
      ATMOE_CHECK_INPUT(::lstat(path.c_str(), &lst) != 0, "{}: {}: a symlink to a missing target", path, what);
      return PathKind::Missing;
    }
    ATMOE_CHECK_INPUT(err != ENOTDIR, "{}: {}: a component of the path is not a directory", path, what);
    ATMOE_INPUT_ERROR("{}: {}: {}", path, what, err == ELOOP ? "symlink loop" : std::strerror(err));
  }
  if (S_ISREG(st.st_mode)) return PathKind::Regular;
  if (S_ISDIR(st.st_mode)) return PathKind::Directory;
  return PathKind::Other;
}

bool path_exists(const std::string& path, const std::string& what) {
  return path_kind(path, what) != PathKind::Missing;
}

static const char* kind_text(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return "not readable";
  if (S_ISFIFO(st.st_mode)) return "a FIFO";
  if (S_ISSOCK(st.st_mode)) return "a socket";
  if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) return "a device";
  return "not a regular file";
}

void require_regular_file(const std::string& path, const std::string& what) {
  switch (path_kind(path, what)) {
    case PathKind::Regular:
      return;
    case PathKind::Missing:
      ATMOE_INPUT_ERROR("{}: {}: not found", path, what);
    case PathKind::Directory:
      ATMOE_INPUT_ERROR("{}: {}: is a directory, expected a file", path, what);
    case PathKind::Other:
      ATMOE_INPUT_ERROR("{}: {}: is {}, expected a regular file", path, what, kind_text(path));
  }
}

void require_directory(const std::string& path, const std::string& what) {
  switch (path_kind(path, what)) {
    case PathKind::Directory:
      return;
    case PathKind::Missing:
      ATMOE_INPUT_ERROR("{}: {}: directory not found", path, what);
    case PathKind::Regular:
      ATMOE_INPUT_ERROR("{}: {}: is a file, expected a directory", path, what);
    case PathKind::Other:
      ATMOE_INPUT_ERROR("{}: {}: is {}, expected a directory", path, what, kind_text(path));
  }
}

std::string read_file(const std::string& path, const std::string& what, size_t max_bytes) {
  require_regular_file(path, what);
  // O_NONBLOCK: should the path have become a FIFO since the check, open() does not block.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  ATMOE_CHECK_INPUT(fd >= 0, "{}: {}: cannot open: {}", path, what, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    ATMOE_INPUT_ERROR("{}: {}: not a regular file", path, what);
  }
  if (size_t(st.st_size) > max_bytes) {
    ::close(fd);
    ATMOE_INPUT_ERROR("{}: {}: {} bytes, more than the {} bytes allowed", path, what, size_t(st.st_size), max_bytes);
  }
  std::string out(size_t(st.st_size), '\0');
  size_t got = 0;
  const auto fail = [&](ssize_t n, int err) {
    ::close(fd);
    ATMOE_INPUT_ERROR("{}: {}: read failed after {} of {} bytes{}{}", path, what, got, size_t(st.st_size),
                      n < 0 ? ": " : "", n < 0 ? std::strerror(err) : "");
  };
  while (got < out.size()) {
    const ssize_t n = ::read(fd, out.data() + got, out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail(n, errno);
    got += size_t(n);
  }
  // Past the size stat gave, until end of file: procfs and sysfs files report 0 bytes.
  for (char buf[4096];;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(n, errno);
    if (n == 0) break;
    if (out.size() + size_t(n) > max_bytes) {
      ::close(fd);
      ATMOE_INPUT_ERROR("{}: {}: more than the {} bytes allowed", path, what, max_bytes);
    }
    out.append(buf, size_t(n));
  }
  ::close(fd);
  return out;
}

void require_writable_file(const std::string& path, const std::string& what) {
  switch (path_kind(path, what)) {
    case PathKind::Regular:
      ATMOE_CHECK_INPUT(::access(path.c_str(), W_OK) == 0, "{}: {}: not writable: {}", path, what,
                        std::strerror(errno));
      break;
    case PathKind::Directory:
      ATMOE_INPUT_ERROR("{}: {}: is a directory, expected a file to write", path, what);
    case PathKind::Other:
      ATMOE_INPUT_ERROR("{}: {}: is {}, expected a file to write", path, what, kind_text(path));
    case PathKind::Missing:
      break;
  }
  // write_file creates a temporary file beside it: the directory must take new files either way.
  fs::path parent = fs::path(path).parent_path();
  const std::string dir = parent.empty() ? std::string(".") : parent.string();
  ATMOE_CHECK_INPUT(path_kind(dir, what) == PathKind::Directory, "{}: {}: directory '{}' does not exist", path, what,
                    dir);
  ATMOE_CHECK_INPUT(::access(dir.c_str(), W_OK | X_OK) == 0, "{}: {}: directory '{}' is not writable: {}", path, what,
                    dir, std::strerror(errno));
}

void prepare_output_dir(const std::string& dir, bool force, const std::string& what) {
  switch (path_kind(dir, what)) {
    case PathKind::Directory: {
      std::error_code ec;
      const bool empty = fs::is_empty(dir, ec);
      ATMOE_CHECK_INPUT(!ec, "{}: {}: {}", dir, what, ec.message());
      ATMOE_CHECK_INPUT(empty || force, "{}: {}: the directory exists and is not empty (--force writes into it)", dir,
                        what);
      return;
    }
    case PathKind::Missing: return;  // the command creates it once its other options are checked
    default:
      ATMOE_INPUT_ERROR("{}: {}: exists and is not a directory", dir, what);
  }
}

void write_file(const std::string& path, const std::string& data, const std::string& what) {
  require_writable_file(path, what);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  ATMOE_CHECK_INPUT(f, "{}: {}: cannot create a file beside it ({}): {}", path, what, tmp, std::strerror(errno));
  const bool ok = std::fwrite(data.data(), 1, data.size(), f) == data.size() && std::fflush(f) == 0;
  const int err = errno;
  if (std::fclose(f) != 0 || !ok) {
    std::remove(tmp.c_str());
    ATMOE_INPUT_ERROR("{}: {}: write failed: {}", path, what, std::strerror(ok ? errno : err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    ATMOE_INPUT_ERROR("{}: {}: cannot replace: {}", path, what, std::strerror(e));
  }
}

}  // namespace atmoe
