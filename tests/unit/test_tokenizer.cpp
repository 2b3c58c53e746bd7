// Tokenizer on a synth-model tokenizer.json: byte-level round trip of arbitrary bytes,
// special-token splitting, chat rendering, and streaming detokenisation that never
// cuts a UTF-8 sequence. (Parity of ids with llama.cpp on the real model: test_parity.)
#include <filesystem>

#include "common/chat_template.h"
#include "common/error.h"
#include "common/tokenizer.h"
#include "common/utf8.h"
#include "coordinator/synth_model.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;

const Tokenizer& tok() {
  static Tokenizer t = [] {
    std::string d = (fs::temp_directory_path() / ("atmoe_tok_" + std::to_string(::getpid()))).string();
    SynthModelOptions o;
    o.out = d;
    o.seed = 3;
    synth_model(o);
    return Tokenizer::from_hf_dir(d);
  }();
  return t;
}

TEST(Tokenizer, RoundTripsArbitraryText) {
  const char* cases[] = {"Hello, world!", "The quick brown fox", "  leading spaces", "tabs\tand\nnewlines\n\n",
                         "emoji 👋🏽🎉 and CJK 你好", "e\u0301 combining", "1234567890", "", " ",
                         "don't stop", "a                      b"};
  for (const char* s : cases) {
    auto ids = tok().encode(s, false);
    EXPECT_EQ(tok().decode(ids), s) << s;
  }
  // Random bytes, including invalid UTF-8: byte-level BPE must still round-trip.
  std::mt19937_64 rng(test_seed() + 20);
  for (int i = 0; i < 50; ++i) {
    std::string s(size_t(rng() % 40), '\0');
    for (auto& c : s) c = char(rng() & 0xff);
    EXPECT_EQ(tok().decode(tok().encode(s, false, false)), s);
  }
}

TEST(Tokenizer, MergesShortenCommonWords) {
  auto ids = tok().encode(" the quick brown fox", false);
  EXPECT_LT(ids.size(), std::string(" the quick brown fox").size());
}

TEST(Tokenizer, SplitsSpecialTokens) {
  int32_t im_start = tok().find_token("<|im_start|>"), im_end = tok().find_token("<|im_end|>");
  ASSERT_GE(im_start, 0);
  auto ids = tok().encode("<|im_start|>user\nhi<|im_end|>", false, true);
  EXPECT_EQ(ids.front(), im_start);
  EXPECT_EQ(ids.back(), im_end);
  auto plain = tok().encode("<|im_start|>", false, false);  // not parsed: spelled out
  EXPECT_GT(plain.size(), 1u);
  EXPECT_EQ(tok().decode(plain), "<|im_start|>");
  EXPECT_TRUE(tok().is_eog(im_end));
  EXPECT_EQ(tok().decode({im_start}), "");  // control tokens are not rendered by default
  EXPECT_EQ(tok().decode({im_start}, true), "<|im_start|>");
}

TEST(Tokenizer, ChatTemplates) {
  EXPECT_EQ(detect_chat_format(tok().chat_template(), "synth"), ChatFormat::ChatML);
  std::string r = render_chat(ChatFormat::ChatML, {{"user", "hi"}}, "", false, "");
  EXPECT_EQ(r, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  std::string s = render_chat(ChatFormat::ChatML, {{"user", "hi"}}, "Be brief.", false, "");
  EXPECT_EQ(s.rfind("<|im_start|>system\nBe brief.<|im_end|>\n", 0), 0u);
  std::string l = render_chat(ChatFormat::Llama3, {{"system", "S"}, {"user", "U"}}, "", true, "<|begin_of_text|>");
  EXPECT_EQ(l, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_THROW(render_chat(ChatFormat::ChatML, {{"robot", "x"}}, "", false, ""), InputError);
  EXPECT_EQ(chat_default_system("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are X<|im_end|>\n' }}"),
            "You are X");
  EXPECT_THROW(detect_chat_format("", "m"), InputError);
}

TEST(Utf8, CompletePrefix) {
  std::string e = "a\xf0\x9f\x91\x8b";  // a + U+1F44B
  for (size_t n = 2; n < e.size(); ++n) EXPECT_EQ(utf8_complete_prefix(e.substr(0, n)), 1u) << n;
  EXPECT_EQ(utf8_complete_prefix(e), e.size());
  EXPECT_EQ(utf8_complete_prefix("\x80\x80"), 2u);  // stray continuation bytes never complete
}

TEST(StreamDecoder, NeverCutsUtf8) {
  std::string text = "héllo 👋🏽 世界 ok";
  auto ids = tok().encode(text, false);
  StreamDecoder dec(tok());
  std::string out;
  for (auto id : ids) {
    std::string piece = dec.push(id);
    EXPECT_EQ(utf8_complete_prefix(piece), piece.size());
    out += piece;
  }
  out += dec.flush();
  EXPECT_EQ(out, text);
}

}  // namespace
}  // namespace atmoe::test
