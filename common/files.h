// Files a user names (models, bundles, adapters, prompts, outputs), checked before use.
// Nothing here throws std::filesystem errors: a missing path, a symlink loop, a directory
// where a file is expected, a FIFO or a device all become one InputError naming the path
// and `what` it was meant to be. Non-regular files are refused before they are opened, so
// a FIFO never blocks a read.
#pragma once
#include <cstddef>
#include <string>

namespace atmoe {

enum class PathKind { Missing, Regular, Directory, Other };

// What `path` is after following symlinks; a symlink loop or an unreadable component is an
// InputError naming the path.
PathKind path_kind(const std::string& path, const std::string& what);
bool path_exists(const std::string& path, const std::string& what);  // any kind

// InputError unless `path` is a regular file / a directory ("{path}: {what}: ...").
void require_regular_file(const std::string& path, const std::string& what);
void require_directory(const std::string& path, const std::string& what);

// The bytes of a regular file of at most max_bytes.
std::string read_file(const std::string& path, const std::string& what, size_t max_bytes = size_t(1) << 30);

// An output file that will be written later: it may exist (a regular file, which is then
// replaced) or not (its directory must exist and be writable). Checked before any work.
void require_writable_file(const std::string& path, const std::string& what);

// An output directory a command fills (synth-model, synth-bundle): missing (the command
// creates it after checking its other options, so a bad option leaves nothing behind), or
// an existing directory that is empty unless `force`.
void prepare_output_dir(const std::string& dir, bool force, const std::string& what);

// Writes `data` to `path` (via a temporary file in the same directory, renamed over it):
// a reader never sees a half-written file. InputError naming the path on failure.
void write_file(const std::string& path, const std::string& data, const std::string& what);

}  // namespace atmoe
