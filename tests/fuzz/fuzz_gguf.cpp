// libFuzzer: any byte string given to the GGUF parser either parses (and every tensor
// dequantises from inside the buffer) or raises InputError.
#include <cstdint>

#include "common/error.h"
#include "common/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    atmoe::GgufFile f(data, size, "fuzz");
    for (const auto& t : f.tensors()) {
      if (t.nbytes > (1u << 20)) continue;  // keep iterations fast; bounds were checked at parse
      (void)f.load_f32(t.name);
    }
  } catch (const atmoe::InputError&) {
  }
  return 0;
}
