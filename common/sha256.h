// SHA-256 (FIPS 180-4), for provenance: the hash of a router's training data is the one
// `sha256sum` prints.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace atmoe {

// Lowercase hex digest of the bytes.
std::string sha256_hex(const void* data, size_t n);

}  // namespace atmoe
