// libFuzzer: any byte string given to the safetensors parser either parses, with every
// tensor view inside the buffer, or raises InputError. Nothing else is allowed.
#include <cstdint>
#include <cstring>

#include "common/error.h"
#include "common/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    atmoe::SafetensorsFile f(data, size, "fuzz");
    uint64_t sum = 0;
    for (const auto& n : f.names()) {
      atmoe::Tensor t = f.get(n);
      const uint8_t* p = static_cast<const uint8_t*>(t.raw());
      if (t.nbytes()) sum += p[0] + p[t.nbytes() - 1];  // ASan checks these are in bounds
    }
    (void)sum;
  } catch (const atmoe::InputError&) {
  }
  return 0;
}
