#include "common/wire.h"

#include <cstring>

#include "common/communicator.h"

#ifndef ATMOE_SOURCE_REVISION
#define ATMOE_SOURCE_REVISION "unknown"
#endif
#ifndef ATMOE_VERSION
#define ATMOE_VERSION "0"
#endif

namespace atmoe {

std::string build_id() {
  return fmt::format("atmoe {} ({}), wire v{}", ATMOE_VERSION, ATMOE_SOURCE_REVISION, kWireVersion);
}

std::vector<uint8_t> wire_json_message(Msg kind, const nlohmann::json& j) {
  const std::string text = j.dump();
  WireHeader h;
  h.kind = uint16_t(kind);
  std::vector<uint8_t> m(sizeof h + text.size());
  std::memcpy(m.data(), &h, sizeof h);
  std::memcpy(m.data() + sizeof h, text.data(), text.size());
  return m;
}

WireHeader wire_header(const std::vector<uint8_t>& m, const std::string& from) {
  WireHeader h;
  if (m.size() < sizeof h)
    throw CommError(
        fmt::format("{} sent a {}-byte message, shorter than the {}-byte atmoe header", from, m.size(), sizeof h), -1);
  std::memcpy(&h, m.data(), sizeof h);
  if (h.magic != kWireMagic)
    throw CommError(
        fmt::format("{} sent a message that is not atmoe's (magic {:#x}): is every rank running atmoe?", from, h.magic),
        -1);
  if (h.version != kWireVersion)
    throw CommError(
        fmt::format("{} speaks atmoe wire version {}, this rank speaks {} ({}): run one atmoe build on every rank",
                    from, h.version, kWireVersion, build_id()),
        -1);
  return h;
}

nlohmann::json wire_json(const std::vector<uint8_t>& m, const std::string& from) {
  try {
    return nlohmann::json::parse(m.begin() + sizeof(WireHeader), m.end());
  } catch (const nlohmann::json::exception& e) {
    throw CommError(fmt::format("{} sent a control message that does not parse: {}", from, e.what()), -1);
  }
}

}  // namespace atmoe
