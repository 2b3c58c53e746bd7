// The protocol between the coordinator (rank 0) and the expert workers, version 1.
//
// Every message starts with a 32-byte WireHeader in the host's byte order (the ranks of a
// job run one atmoe build: hello checks the build id, and a peer whose magic or version
// differs is refused with a message naming both).
//
//   ctrl communicator, tag kTagCtrl:
//     Hello      0 -> w   JSON: build, bundle dir and hash, dtype, model shapes, the groups
//                         the worker holds (placement), whether it holds the general expert
//     Ready      w -> 0   JSON: ok | error + exit code; host, pid, threads, bytes, the
//                         worker's columns (bundle expert indices) and per-layer inputs
//     Stats      0 -> w   (empty)          StatsReply w -> 0   JSON counters
//     Shutdown   0 -> w   JSON: {code, final}: end the session (final: and the process, with code)
//   data communicator:
//     Work   tag kTagWork, 0 -> w: header {step, layer, input, rows T_w, cols C}, then
//            [T_w, C] f32 coefficients (C > 0: the layer's first message to this worker;
//            C = 0: reuse the layer's) and [T_w, d_in] f32 activations of the tokens that
//            use the worker's experts, in token order
//     Result tag kTagResult, w -> 0: header (same step/layer/input/rows, cols = out_cols),
//            then [T_w, out_cols] f32 partial sums Σ_e w·s·B_e(A_e x), sites side by side
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace atmoe {

constexpr uint32_t kWireMagic = 0x454f4d41;  // "AMOE"
constexpr uint16_t kWireVersion = 2;  // 2: run-time adapters
constexpr int kTagCtrl = 1, kTagWork = 2, kTagResult = 3;

// LoadAdapter {col, name, dir} / UnloadAdapter {col} -> AdapterReply {ok, error, inputs, bytes}:
// a run-time adapter (the server's load_lora_adapter) as coefficient column col.
enum class Msg : uint16_t {
  Hello = 1, Ready = 2, Stats = 3, StatsReply = 4, Shutdown = 5,
  LoadAdapter = 6, UnloadAdapter = 7, AdapterReply = 8,
  Work = 16, Result = 17
};

struct WireHeader {
  uint32_t magic = kWireMagic;
  uint16_t version = kWireVersion;
  uint16_t kind = 0;
  uint64_t step = 0;
  int32_t layer = 0, input = 0;
  int32_t rows = 0, cols = 0;
};
static_assert(sizeof(WireHeader) == 32, "the wire header is 32 bytes");

// This build's identity: version, source revision and wire version.
std::string build_id();
// Header + JSON text.
std::vector<uint8_t> wire_json_message(Msg kind, const nlohmann::json& j);
// The header of a received message, checked (size, magic, version): CommError naming `from`.
WireHeader wire_header(const std::vector<uint8_t>& m, const std::string& from);
// The JSON payload after the header: CommError naming `from` when it does not parse.
nlohmann::json wire_json(const std::vector<uint8_t>& m, const std::string& from);

}  // namespace atmoe
