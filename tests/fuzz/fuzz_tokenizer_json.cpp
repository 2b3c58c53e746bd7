// libFuzzer: the input is the text of an HF tokenizer.json. Tokenizer::from_hf_dir either
// loads it or raises InputError; a tokenizer that loads must then encode and decode a few
// fixed strings (specials, digits, CJK, emoji, invalid UTF-8) without any other outcome.
// tokenizer_config.json is fixed (BOS/EOS named as a string and as an object).
#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/tokenizer.h"
#include "tests/fuzz/fuzz_files.h"

namespace {
const char* kConfig = R"({"bos_token": "<|endoftext|>", "eos_token": {"content": "<|im_end|>"},
 "add_bos_token": true, "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"})";

const char* kTexts[] = {
    "Hello, world! The quick brown fox 0123456789.",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces\ttabs\r\nnewlines\n\n  don't STOP 'll 've",
    "emoji \xF0\x9F\x91\x8B\xF0\x9F\x8F\xBD CJK \xE4\xBD\xA0\xE5\xA5\xBD e\xCC\x81",
    "invalid \xFF\xFE\xC0 utf8 \xE4\xBD",
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = atmoe::fuzz::scratch_dir();
  static const bool once = (atmoe::fuzz::put_file(dir + "/tokenizer_config.json", std::string(kConfig)), true);
  (void)once;
  atmoe::fuzz::put_file(dir + "/tokenizer.json", data, size);
  try {
    atmoe::Tokenizer t = atmoe::Tokenizer::from_hf_dir(dir);
    (void)t.summary();
    for (const char* s : kTexts) {
      for (bool special : {true, false}) {
        std::vector<int32_t> ids = t.encode(s, t.add_bos_default(), special);
        for (int32_t id : ids)
          if (id < 0 || id >= t.vocab_size()) __builtin_trap();  // encode must return vocabulary ids
        (void)t.decode(ids, false);
        (void)t.decode(ids, true);
        atmoe::StreamDecoder sd(t);
        for (int32_t id : ids) (void)sd.push(id);
        (void)sd.flush();
      }
    }
    for (int32_t id : {t.bos_id(), t.eos_id(), 0, t.vocab_size() - 1})
      if (id >= 0 && id < t.vocab_size()) (void)t.token_bytes(id, true);
    atmoe::fuzz::report("loaded");
  } catch (const atmoe::InputError& e) {
    atmoe::fuzz::report(e.what());
  }
  return 0;
}
