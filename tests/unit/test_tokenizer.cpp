// Tokenizer on a synth-model tokenizer.json: byte-level round trip of arbitrary bytes,
// special-token splitting, chat rendering, and streaming detokenisation that never
// cuts a UTF-8 sequence. (Parity of ids with llama.cpp on the real model: test_parity.)
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "common/chat_template.h"
#include "common/error.h"
#include "common/tokenizer.h"
#include "common/utf8.h"
#include "coordinator/synth_model.h"
#include "tests/unit/check.h"

namespace atmoe::test {
namespace {
namespace fs = std::filesystem;

const std::string& tok_dir() {
  static std::string d = [] {
    std::string d = (fs::temp_directory_path() / ("atmoe_tok_" + std::to_string(::getpid()))).string();
    SynthModelOptions o;
    o.out = d;
    o.seed = 3;
    synth_model(o);
    return d;
  }();
  return d;
}

const Tokenizer& tok() {
  static Tokenizer t = Tokenizer::from_hf_dir(tok_dir());
  return t;
}

// The textbook BPE loop (rescan every adjacent pair, merge the lowest rank, leftmost on
// ties) on one pre-token of ASCII letters (their byte-unicode form is themselves): the
// specification the tokenizer's heap-based merge must reproduce.
std::vector<int32_t> naive_bpe(const std::string& word) {
  static const auto tj = nlohmann::json::parse(std::ifstream(tok_dir() + "/tokenizer.json"));
  static const auto ranks = [] {
    std::map<std::string, int> r;
    int k = 0;
    for (const auto& m : tj["model"]["merges"]) r[m.get<std::string>()] = k++;
    return r;
  }();
  std::vector<std::string> sym;
  for (char c : word) sym.emplace_back(1, c);
  while (sym.size() > 1) {
    int best = INT32_MAX;
    size_t at = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = ranks.find(sym[i] + " " + sym[i + 1]);
      if (it != ranks.end() && it->second < best) best = it->second, at = i;
    }
    if (best == INT32_MAX) break;
    sym[at] += sym[at + 1];
    sym.erase(sym.begin() + long(at) + 1);
  }
  std::vector<int32_t> ids;
  for (const auto& x : sym) ids.push_back(tj["model"]["vocab"][x].get<int32_t>());
  return ids;
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

TEST(Tokenizer, HeapMergeEqualsTheNaiveRescan) {
  // Letters of the synth corpus, so that many merges (and ties between equal pairs) occur.
  const std::string alpha = "etaoinshrdlu";
  std::mt19937_64 rng(test_seed() + 21);
  for (int i = 0; i < 300; ++i) {
    std::string w(size_t(1 + rng() % (i < 250 ? 24 : 400)), 'e');
    for (auto& c : w) c = alpha[rng() % (1 + rng() % alpha.size())];
    if (rng() % 4 == 0) w = std::string(w.size(), w[0]);  // runs: "eeee..." overlapping equal pairs
    EXPECT_EQ(tok().encode(w, false), naive_bpe(w)) << w;
  }
}

TEST(Tokenizer, LongInputsEncodeAndRoundTrip) {
  // Quadratic merging or special-token scanning would take minutes here (bench/bench_tokenizer.py times it).
  const std::string a(200000, 'a');
  auto ids = tok().encode(a, false);
  EXPECT_EQ(tok().decode(ids), a);
  std::string sp;
  for (int i = 0; i < 20000; ++i) sp += i % 3 ? "<|im_start|>x " : "<|im_end|>";
  ids = tok().encode(sp, false, true);
  EXPECT_EQ(tok().decode(ids, true), sp);
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

TEST(Utf8, SanitizeReplacesEveryInvalidByte) {
  const std::string ok = "a\xc3\xa9\xe4\xb8\x96\xf0\x9f\x91\x8b";  // a é 世 👋
  EXPECT_EQ(utf8_sanitize(ok), ok);
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(utf8_sanitize("\x80"), r);                          // stray continuation
  EXPECT_EQ(utf8_sanitize("a\xc3"), "a" + r);                   // truncated
  EXPECT_EQ(utf8_sanitize("\xc0\xaf"), r + r);                  // overlong '/'
  EXPECT_EQ(utf8_sanitize("\xed\xa0\x80"), r + r + r);          // surrogate U+D800
  EXPECT_EQ(utf8_sanitize("\xf4\x90\x80\x80"), r + r + r + r);  // past U+10FFFF
  EXPECT_EQ(utf8_sanitize("\xff" + ok), r + ok);
  // Random bytes: the output is valid (sanitizing again changes nothing) and keeps valid runs.
  std::mt19937_64 rng(test_seed() + 22);
  for (int i = 0; i < 200; ++i) {
    std::string s(size_t(rng() % 64), '\0');
    for (auto& c : s) c = char(rng() & 0xff);
    const std::string o = utf8_sanitize(s);
    EXPECT_EQ(utf8_sanitize(o), o);
  }
}

TEST(StreamDecoder, RandomTokensAlwaysGiveValidUtf8) {
  // Sampling can produce any token order: byte tokens that never complete a sequence, or
  // end mid-sequence. Every piece, and the flushed end, is valid UTF-8.
  std::mt19937_64 rng(test_seed() + 23);
  for (int rep = 0; rep < 200; ++rep) {
    StreamDecoder dec(tok());
    std::string out;
    for (int i = 0; i < 16; ++i) {
      std::string piece = dec.push(int32_t(rng() % uint64_t(tok().vocab_size())));
      EXPECT_EQ(utf8_sanitize(piece), piece);
      out += piece;
    }
    std::string end = dec.flush();
    EXPECT_EQ(utf8_sanitize(end), end);
  }
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
