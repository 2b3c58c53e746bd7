// Tokenizer on a synth-model tokenizer.json: byte-level round trip of arbitrary bytes,
// special-token splitting, chat rendering, and streaming detokenisation that never
// cuts a UTF-8 sequence. (Parity of ids with llama.cpp on the real model: test_parity.)
#include <filesystem>
#include <fstream>
#include <functional>
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
  // One pre-token of 200 kB that merges all the way (corpus words, no spaces): the textbook
  // rescan would take minutes, as would a per-match UTF-8 check or special-token rescans
  // (bench/bench_tokenizer.cpp times the growth; ctest's timeout bounds this test).
  std::string a;
  while (a.size() < 200000) a += "thequickbrownfoxjumpsoverthelazydog";
  auto ids = tok().encode(a, false);
  EXPECT_EQ(tok().decode(ids), a);
  EXPECT_LT(ids.size(), a.size() * 9 / 10);  // merges happened
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

// ---- Bad tokenizer files: each is refused with one InputError naming the file and field.

// A copy of the synth tokenizer with tokenizer.json / tokenizer_config.json edited by `edit`.
std::string edited_tok_dir(const std::string& name, const std::function<void(nlohmann::json&)>& edit,
                           const std::function<void(nlohmann::json&)>& edit_cfg = nullptr) {
  const std::string d = tok_dir() + "_" + name;
  fs::create_directories(d);
  auto tj = nlohmann::json::parse(std::ifstream(tok_dir() + "/tokenizer.json"));
  auto tc = nlohmann::json::parse(std::ifstream(tok_dir() + "/tokenizer_config.json"));
  if (edit) edit(tj);
  if (edit_cfg) edit_cfg(tc);
  std::ofstream(d + "/tokenizer.json") << tj.dump();
  std::ofstream(d + "/tokenizer_config.json") << tc.dump();
  return d;
}

// The InputError text of loading `dir` ("" when it loads).
std::string load_error(const std::string& dir) {
  try {
    Tokenizer::from_hf_dir(dir);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_REFUSED(dir, ...)                                                              \
  do {                                                                                        \
    const std::string err_ = load_error(dir);                                                 \
    EXPECT_FALSE(err_.empty()) << "accepted: " << (dir);                                      \
    for (const char* want_ : {__VA_ARGS__}) EXPECT_NE(err_.find(want_), std::string::npos) << err_; \
    EXPECT_EQ(err_.find('\n'), std::string::npos) << err_;                                    \
  } while (0)

TEST(Tokenizer, RefusesOptionsThatWouldChangeTheIds) {
  using J = nlohmann::json;
  EXPECT_REFUSED(edited_tok_dir("lower", [](J& t) { t["normalizer"] = {{"type", "Lowercase"}}; }), "tokenizer.json",
                 "normalizer", "Lowercase");
  EXPECT_REFUSED(edited_tok_dir("nfd", [](J& t) { t["normalizer"] = {{"type", "NFD"}}; }), "normalizer", "NFD");
  EXPECT_REFUSED(edited_tok_dir("aps", [](J& t) { t["pre_tokenizer"]["add_prefix_space"] = true; }),
                 "pre_tokenizer.add_prefix_space", "not supported");
  EXPECT_REFUSED(edited_tok_dir("aps_str", [](J& t) { t["pre_tokenizer"]["add_prefix_space"] = "yes"; }),
                 "pre_tokenizer.add_prefix_space", "true or false");
  EXPECT_REFUSED(edited_tok_dir("no_bl", [](J& t) { t["pre_tokenizer"] = nullptr; }), "pre_tokenizer", "ByteLevel");
  EXPECT_REFUSED(edited_tok_dir("bf", [](J& t) { t["model"]["byte_fallback"] = true; }), "model.byte_fallback");
  EXPECT_REFUSED(edited_tok_dir("dec", [](J& t) { t["decoder"] = {{"type", "Metaspace"}}; }), "decoder.type", "Metaspace");
  EXPECT_REFUSED(edited_tok_dir("split", [](J& t) {
                   t["pre_tokenizer"] = {{"type", "Sequence"},
                                         {"pretokenizers",
                                          {{{"type", "Split"}, {"pattern", {{"Regex", "\\s+"}}}, {"behavior", "Removed"}},
                                           {{"type", "ByteLevel"}, {"use_regex", false}}}}};
                 }),
                 "pre_tokenizer.pretokenizers[0].behavior", "Removed");
  // A type error names the field instead of surfacing the JSON library's text.
  EXPECT_REFUSED(edited_tok_dir("vid", [](J& t) { t["model"]["vocab"]["a"] = "97"; }), "model.vocab.a", "integer");
  EXPECT_REFUSED(edited_tok_dir("vdup", [](J& t) { t["model"]["vocab"]["a"] = t["model"]["vocab"]["b"]; }), "model.vocab");
}

TEST(Tokenizer, RefusesBadMerges) {
  using J = nlohmann::json;
  EXPECT_REFUSED(edited_tok_dir("m_str", [](J& t) { t["model"]["merges"] = "a b"; }), "model.merges", "expected a list");
  EXPECT_REFUSED(edited_tok_dir("m_3", [](J& t) { t["model"]["merges"].push_back("a b c"); }), "model.merges[", "one space");
  EXPECT_REFUSED(edited_tok_dir("m_1", [](J& t) { t["model"]["merges"].push_back("ab"); }), "model.merges[");
  EXPECT_REFUSED(edited_tok_dir("m_l3", [](J& t) { t["model"]["merges"] = J::array({J::array({"a", "b", "c"})}); }),
                 "model.merges[0]");
  EXPECT_REFUSED(edited_tok_dir("m_unk", [](J& t) { t["model"]["merges"].push_back("zzzqq yyyxx"); }), "model.merges[",
                 "'zzzqq' is not in model.vocab");
  EXPECT_REFUSED(edited_tok_dir("m_res", [](J& t) { t["model"]["merges"].push_back("q q"); }), "'qq' is not in model.vocab");
  // The list form ["left", "right"] is the same tokenizer.
  const Tokenizer pairs = Tokenizer::from_hf_dir(edited_tok_dir("m_pairs", [](J& t) {
    J m = J::array();
    for (const auto& x : t["model"]["merges"]) {
      const std::string s = x.get<std::string>();
      m.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
    }
    t["model"]["merges"] = m;
  }));
  EXPECT_EQ(pairs.encode(" the quick brown fox", false), tok().encode(" the quick brown fox", false));
}

TEST(Tokenizer, RefusesBadVocabularyAndAddedTokens) {
  using J = nlohmann::json;
  // No token for byte 0x00 (U+0100 in the byte alphabet) and no unk token: that byte would vanish.
  EXPECT_REFUSED(edited_tok_dir("nobyte", [](J& t) { t["model"]["vocab"].erase("\xc4\x80"); }), "model.vocab",
                 "byte 0x00");
  EXPECT_REFUSED(edited_tok_dir("a_clash", [](J& t) { t["added_tokens"][0]["id"] = 97; t["added_tokens"][0]["content"] = "<x>"; }),
                 "added_tokens[0].id", "97");
  EXPECT_REFUSED(edited_tok_dir("a_obj", [](J& t) { t["added_tokens"] = J::object(); }), "added_tokens", "expected a list");
  EXPECT_REFUSED(edited_tok_dir("a_neg", [](J& t) { t["added_tokens"][0]["id"] = -4; }), "added_tokens[0].id", "0..");
  EXPECT_REFUSED(edited_tok_dir("a_sp", [](J& t) { t["added_tokens"][0]["special"] = "yes"; }), "added_tokens[0].special");
  EXPECT_REFUSED(edited_tok_dir("unk", [](J& t) { t["model"]["unk_token"] = "<nope>"; }), "model.unk_token");
  // fuzz_tokenizer_json's finding (UBSan float-cast-overflow): ids written as huge floats.
  EXPECT_REFUSED(edited_tok_dir("f_vocab", [](J& t) { t["model"]["vocab"]["a"] = 1e40; }), "model.vocab.a", "1e+40");
  EXPECT_REFUSED(edited_tok_dir("f_added", [](J& t) { t["added_tokens"][0]["id"] = 1e40; }), "added_tokens[0].id", "1e+40");
  // Deeply nested pre_tokenizer/post_processor Sequences are refused, not recursed into.
  EXPECT_REFUSED(edited_tok_dir("deep", [](J& t) {
    J p = t["pre_tokenizer"];
    for (int i = 0; i < 50; ++i) p = {{"type", "Sequence"}, {"pretokenizers", J::array({p})}};
    t["pre_tokenizer"] = p;
  }), "pre_tokenizer", "nested more than 8 deep");
}

TEST(Tokenizer, NfcNormalizerComposesBeforeSplitting) {
  // Qwen2's tokenizer.json normalizes to NFC: "e" + U+0301 must encode as "é" does; without
  // the normalizer the two differ.
  const Tokenizer nfc = Tokenizer::from_hf_dir(edited_tok_dir("nfc", [](nlohmann::json& t) { t["normalizer"] = {{"type", "NFC"}}; }));
  const std::string decomposed = "caf\x65\xcc\x81 A\xcc\x8a", composed = "caf\xc3\xa9 \xc3\x85";
  EXPECT_EQ(nfc.encode(decomposed, false), nfc.encode(composed, false));
  EXPECT_EQ(nfc.decode(nfc.encode(decomposed, false)), composed);
  EXPECT_NE(tok().encode(decomposed, false), tok().encode(composed, false));
  // Special tokens are matched on the raw text; invalid UTF-8 passes through unchanged.
  EXPECT_EQ(nfc.encode("<|im_start|>", false, true).size(), 1u);
  const std::string bad = "a\xff\xfe" "b";
  EXPECT_EQ(nfc.decode(nfc.encode(bad, false)), bad);
  // A NUL byte does not end the text (utf8proc_NFC would stop there).
  const std::string nul = std::string("e\xcc\x81", 3) + std::string(1, '\0') + "tail";
  EXPECT_EQ(nfc.decode(nfc.encode(nul, false)), std::string("\xc3\xa9", 2) + std::string(1, '\0') + "tail");
}

TEST(Tokenizer, IgnoreMergesEmitsAWholeVocabularyWord) {
  using J = nlohmann::json;
  // "zqx" is a token of its own but no merge builds it: HF's ignore_merges takes it whole.
  const int32_t id = tok().vocab_size();  // a new id past the vocabulary and the added tokens
  auto add = [&](J& t) { t["model"]["vocab"]["zqx"] = id; };
  const Tokenizer plain = Tokenizer::from_hf_dir(edited_tok_dir("im0", add));
  const Tokenizer whole = Tokenizer::from_hf_dir(edited_tok_dir("im1", [&](J& t) {
    add(t);
    t["model"]["ignore_merges"] = true;
  }));
  EXPECT_GT(plain.encode("zqx", false).size(), 1u);
  EXPECT_EQ(whole.encode("zqx", false), std::vector<int32_t>{id});
  EXPECT_EQ(whole.encode(" the", false), tok().encode(" the", false));
}

TEST(Tokenizer, RefusesBadTokenizerConfig) {
  using J = nlohmann::json;
  EXPECT_REFUSED(edited_tok_dir("eos_nope", nullptr, [](J& c) { c["eos_token"] = "<nope>"; }), "tokenizer_config.json",
                 "eos_token", "<nope>");
  for (const J& bad : {J(5), J::array({1}), J::object()})
    EXPECT_REFUSED(edited_tok_dir("eos_t", nullptr, [&](J& c) { c["eos_token"] = bad; }), "eos_token");
  EXPECT_REFUSED(edited_tok_dir("bos_nope", nullptr, [](J& c) { c["bos_token"] = "<nope>"; }), "bos_token");
  EXPECT_REFUSED(edited_tok_dir("abt", nullptr, [](J& c) { c["add_bos_token"] = "yes"; }), "add_bos_token");
  EXPECT_REFUSED(edited_tok_dir("ct_int", nullptr, [](J& c) { c["chat_template"] = 5; }), "chat_template");
  EXPECT_REFUSED(edited_tok_dir("ct_nodef", nullptr,
                                [](J& c) { c["chat_template"] = J::array({{{"name", "tool_use"}, {"template", "x"}}}); }),
                 "chat_template", "default");
  // Empty or null = no such token; HF's list of named templates: "default" is served.
  const Tokenizer t = Tokenizer::from_hf_dir(edited_tok_dir("ok", nullptr, [](J& c) {
    c["bos_token"] = "";
    c["eos_token"] = {{"content", "<|im_end|>"}, {"__type", "AddedToken"}};
    c["chat_template"] = J::array({{{"name", "tool_use"}, {"template", "T"}}, {{"name", "default"}, {"template", "D"}}});
  }));
  EXPECT_EQ(t.chat_template(), "D");
  EXPECT_EQ(t.bos_id(), -1);
  EXPECT_EQ(t.eos_id(), tok().find_token("<|im_end|>"));
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
