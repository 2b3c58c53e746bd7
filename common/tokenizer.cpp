#include "common/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <climits>
#include <filesystem>
#include <functional>
#include <queue>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/files.h"
#include "common/gguf.h"
#include "common/json_reader.h"
#include "common/utf8.h"

namespace atmoe {
using json = nlohmann::json;

namespace {
// Pre-tokenizer regexes (HF tokenizers / llama.cpp llama-vocab.cpp).
const char* kGpt2Re = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* kLlama3Re =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* kQwen2Re =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* kDigitRe = R"(\p{N})";

// GPT-2 bytes_to_unicode: printable bytes map to themselves, the rest to 256+n.
struct ByteMap {
  std::string to_uni[256];
  std::unordered_map<std::string, uint8_t> from_uni;
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      uint32_t cp = keep ? uint32_t(b) : uint32_t(256 + n++);
      utf8_append(to_uni[b], cp);
      from_uni[to_uni[b]] = uint8_t(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}
}  // namespace

struct Tokenizer::Compiled {
  pcre2_code* code = nullptr;
  ~Compiled() {
    if (code) pcre2_code_free(code);
  }
};

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

static std::vector<std::string> regexes_for_pre(const std::string& pre, const std::string& src) {
  if (pre == "gpt2" || pre == "default" || pre.empty()) return {kGpt2Re};
  if (pre == "smollm" || pre == "starcoder" || pre == "refact") return {kDigitRe, kGpt2Re};
  if (pre == "llama-bpe" || pre == "llama3" || pre == "smaug-bpe") return {kLlama3Re};
  if (pre == "qwen2" || pre == "deepseek-r1-qwen") return {kQwen2Re};
  ATMOE_INPUT_ERROR("{}: tokenizer.ggml.pre '{}' is not supported (expected gpt2, smollm, llama-bpe or qwen2)", src, pre);
}

void Tokenizer::finalize(const std::string& src, const char* vocab_field) {
  ATMOE_CHECK_INPUT(!id_to_token_.empty(), "{}: tokenizer has no vocabulary", src);
  for (size_t i = 0; i < id_to_token_.size(); ++i) token_to_id_.emplace(id_to_token_[i], int32_t(i));
  for (size_t i = 0; i < id_to_token_.size(); ++i)
    if (types_[i] == TokenType::Control || types_[i] == TokenType::UserDefined || types_[i] == TokenType::Unknown)
      if (!id_to_token_[i].empty()) specials_.emplace_back(id_to_token_[i], int32_t(i));
  std::stable_sort(specials_.begin(), specials_.end(),
                   [](auto& a, auto& b) { return a.first.size() > b.first.size(); });
  for (int32_t i = 0; i < vocab_size(); ++i) max_token_bytes_ = std::max(max_token_bytes_, token_bytes(i, true).size());
  for (const auto& r : regexes_) {
    int err = 0;
    PCRE2_SIZE off = 0;
    auto c = std::make_unique<Compiled>();
    c->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(r.c_str()), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                            &err, &off, nullptr);
    ATMOE_CHECK_INPUT(c->code, "{}: pre-tokenizer regex does not compile at offset {}: {}", src, off, r);
    pcre2_jit_compile(c->code, PCRE2_JIT_COMPLETE);
    compiled_.push_back(std::move(c));
  }
  auto check_id = [&](int32_t id, const char* what) {
    ATMOE_CHECK_INPUT(id < int32_t(id_to_token_.size()), "{}: {} id {} outside the vocabulary of {}", src, what, id,
                      id_to_token_.size());
  };
  check_id(bos_, "BOS");
  check_id(eos_, "EOS");
  check_id(unk_, "UNK");
  // Without an unknown token, a byte whose single-character token is missing could not be
  // encoded at all: it would silently vanish from the input.
  if (unk_ < 0) {
    const auto& bm = byte_map();
    for (int b = 0; b < 256; ++b) {
      auto it = token_to_id_.find(bm.to_uni[b]);
      ATMOE_CHECK_INPUT(it != token_to_id_.end() && types_[size_t(it->second)] != TokenType::Control &&
                            types_[size_t(it->second)] != TokenType::Unknown && types_[size_t(it->second)] != TokenType::Unused,
                        "{}: {}: no token for byte 0x{:02x} ('{}') and no unknown token: byte-level BPE needs all "
                        "256 byte tokens", src, vocab_field, b, bm.to_uni[b]);
    }
  }
  if (eos_ >= 0) eog_.push_back(eos_);
  for (const char* t : {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>"}) {
    int32_t id = find_token(t);
    if (id >= 0 && types_[size_t(id)] == TokenType::Control &&
        std::find(eog_.begin(), eog_.end(), id) == eog_.end())
      eog_.push_back(id);
  }
}

Tokenizer Tokenizer::from_gguf(const GgufFile& f) {
  Tokenizer t;
  const std::string& src = f.path();
  ATMOE_CHECK_INPUT(f.has("tokenizer.ggml.model"), "{}: missing tokenizer (no tokenizer.ggml.model key)", src);
  std::string model = f.get_str("tokenizer.ggml.model");
  ATMOE_CHECK_INPUT(model == "gpt2", "{}: tokenizer.ggml.model '{}' is not supported (expected gpt2 byte-level BPE)", src, model);
  const auto& toks = f.get_arr("tokenizer.ggml.tokens");
  ATMOE_CHECK_INPUT(!toks.empty() && toks.size() <= (1u << 22), "{}: tokenizer.ggml.tokens has {} entries", src, toks.size());
  for (const auto& v : toks) {
    ATMOE_CHECK_INPUT(v.kind == GgufValue::STRING, "{}: tokenizer.ggml.tokens must hold strings", src);
    t.id_to_token_.push_back(v.s);
  }
  t.types_.assign(t.id_to_token_.size(), TokenType::Normal);
  if (f.has("tokenizer.ggml.token_type")) {
    const auto& ty = f.get_arr("tokenizer.ggml.token_type");
    ATMOE_CHECK_INPUT(ty.size() == toks.size(), "{}: tokenizer.ggml.token_type has {} entries, tokens has {}", src,
                      ty.size(), toks.size());
    for (size_t i = 0; i < ty.size(); ++i) {
      int64_t v = ty[i].i;
      ATMOE_CHECK_INPUT(v >= 1 && v <= 6, "{}: tokenizer.ggml.token_type[{}] = {} (expected 1..6)", src, i, v);
      t.types_[i] = TokenType(v);
    }
  }
  // Merges "left right": as llama.cpp, split at the first space after the first byte; both
  // sides and their concatenation must be tokens (a merge to nothing would drop text).
  std::unordered_map<std::string, int32_t> ids;
  for (size_t i = 0; i < t.id_to_token_.size(); ++i) ids.emplace(t.id_to_token_[i], int32_t(i));
  const auto& merges = f.get_arr("tokenizer.ggml.merges");
  ATMOE_CHECK_INPUT(merges.size() <= (1u << 24), "{}: tokenizer.ggml.merges has {} entries", src, merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    ATMOE_CHECK_INPUT(merges[i].kind == GgufValue::STRING, "{}: tokenizer.ggml.merges must hold strings", src);
    const std::string& s = merges[i].s;
    const size_t sp = s.find(' ', 1);
    ATMOE_CHECK_INPUT(sp != std::string::npos && sp + 1 < s.size(),
                      "{}: tokenizer.ggml.merges[{}] = '{}': expected two tokens separated by a space", src, i, s);
    const std::string l = s.substr(0, sp), r = s.substr(sp + 1);
    for (const std::string& tok : {l, r, l + r})
      ATMOE_CHECK_INPUT(ids.count(tok), "{}: tokenizer.ggml.merges[{}] = '{}': '{}' is not in tokenizer.ggml.tokens", src,
                        i, s, tok);
    t.merge_rank_.emplace(s, int32_t(i));
  }
  // The special token ids atmoe reads (bos, eos, unk, eot) must name tokens of the vocabulary;
  // the others (padding, sep, cls, mask) are not used, and llama.cpp tolerates them out of range.
  const int64_t n_vocab = int64_t(t.id_to_token_.size());
  auto id_or = [&](const char* k) { return f.has(k) ? int32_t(f.get_int(k, 0, n_vocab - 1)) : -1; };
  t.bos_ = id_or("tokenizer.ggml.bos_token_id");
  t.eos_ = id_or("tokenizer.ggml.eos_token_id");
  t.unk_ = id_or("tokenizer.ggml.unknown_token_id");
  t.pre_name_ = f.has("tokenizer.ggml.pre") ? f.get_str("tokenizer.ggml.pre") : "gpt2";
  t.add_bos_ = f.get_bool("tokenizer.ggml.add_bos_token", t.pre_name_ == "llama-bpe");
  if (f.has("tokenizer.chat_template")) t.chat_template_ = f.get_str("tokenizer.chat_template");
  t.regexes_ = regexes_for_pre(t.pre_name_, src);
  // llama.cpp's llama3 pre-tokenizer type sets ignore_merges, as the HF tokenizer.json does.
  t.ignore_merges_ = t.pre_name_ == "llama-bpe" || t.pre_name_ == "llama3";
  if (!f.has("tokenizer.ggml.add_bos_token")) t.add_bos_ = t.add_bos_ && t.bos_ >= 0;
  ATMOE_CHECK_INPUT(!t.add_bos_ || t.bos_ >= 0, "{}: tokenizer.ggml.add_bos_token is true but there is no "
                    "tokenizer.ggml.bos_token_id", src);
  t.finalize(src, "tokenizer.ggml.tokens");
  int32_t eot = id_or("tokenizer.ggml.eot_token_id");
  if (eot >= 0 && std::find(t.eog_.begin(), t.eog_.end(), eot) == t.eog_.end()) t.eog_.push_back(eot);
  return t;
}

// Collects the regex sequence of an HF pre_tokenizer spec. Byte-level BPE only: the
// sequence must end with a ByteLevel step (the byte-to-unicode map), and every option that
// would change the pieces is either implemented or refused.
static void hf_pretok(const JsonAt& p, std::vector<std::string>& out, bool& byte_level, int depth = 0) {
  if (depth > 8) p.fail("Sequence nested more than 8 deep");
  p.object();
  const std::string ty = p["type"].str();
  if (byte_level) p.fail("a '" + ty + "' step after ByteLevel is not supported (ByteLevel must come last)");
  if (ty == "Sequence") {
    const JsonAt seq = p["pretokenizers"];
    seq.array();
    for (size_t i = 0; i < seq.size(); ++i) hf_pretok(seq.at(i), out, byte_level, depth + 1);
  } else if (ty == "Digits") {
    if (!p.bool_or("individual_digits", false)) p["individual_digits"].fail("only individual_digits: true is supported");
    out.push_back(kDigitRe);
  } else if (ty == "ByteLevel") {
    if (p.bool_or("add_prefix_space", false)) p["add_prefix_space"].fail("true is not supported (expected false)");
    p.bool_or("trim_offsets", true);  // offsets only: type-checked
    if (p.bool_or("use_regex", true)) out.push_back(kGpt2Re);
    byte_level = true;
  } else if (ty == "Split") {
    const JsonAt pat = p["pattern"];
    pat.object();
    if (pat.has("Regex")) {
      out.push_back(pat["Regex"].str());
    } else {
      pat.fail("expected {\"Regex\": ...} (a String pattern is not supported)");
    }
    const std::string behavior = p.str_or("behavior", "Isolated");
    if (behavior != "Isolated") p["behavior"].fail("'" + behavior + "' is not supported (expected Isolated)");
    if (p.bool_or("invert", false)) p["invert"].fail("true is not supported (expected false)");
  } else {
    p["type"].fail("'" + ty + "' is not supported (expected ByteLevel, Split, Digits or Sequence)");
  }
}

// HF's "token" / {"content": "token", ...} (AddedToken) forms of tokenizer_config.json's
// bos_token and eos_token; "" when absent, null or empty (no such token).
static std::string hf_token_field(const JsonAt& cfg, const char* key) {
  if (!cfg.has(key)) return {};
  const JsonAt v = cfg[key];
  if (v.value().is_string()) return v.str();
  if (v.value().is_object()) return v["content"].str();
  v.fail("expected a token string, an object with \"content\", or null, got " + json_describe(v.value()));
}

Tokenizer Tokenizer::from_hf_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  std::string path = (fs::path(dir) / "tokenizer.json").string();
  ATMOE_CHECK_INPUT(path_exists(path, "tokenizer"), "{}: missing tokenizer (tokenizer.json not found)", path);
  const json j = read_json_file(path, "tokenizer", size_t(256) << 20);
  const JsonAt root(j, path);
  root.object();
  Tokenizer t;
  const int64_t kMaxId = (int64_t(1) << 22) - 1;
  // Normalizers rewrite the text before splitting: NFC (Qwen2's) is implemented with
  // utf8proc; anything else would silently change the ids and is refused.
  if (root.has("normalizer")) {
    const JsonAt nm = root["normalizer"];
    nm.object();
    const std::string ty = nm["type"].str();
    if (ty == "NFC") t.nfc_ = true;
    else if (!(ty == "Sequence" && nm.has("normalizers") && nm["normalizers"].array().empty()))
      nm["type"].fail("normalizer '" + ty + "' is not supported (expected null or NFC)");
  }
  const JsonAt m = root["model"];
  m.object();
  const std::string type = m.str_or("type", "BPE");
  if (type != "BPE") m["type"].fail("'" + type + "' is not supported (expected BPE)");
  if (m.bool_or("byte_fallback", false)) m["byte_fallback"].fail("true is not supported (byte-level BPE needs no byte fallback)");
  t.ignore_merges_ = m.bool_or("ignore_merges", false);
  if (m.has("dropout") && m["dropout"].number(0, 1) != 0) m["dropout"].fail("BPE dropout is not supported (expected null)");
  if (!m.str_or("continuing_subword_prefix", "").empty()) m["continuing_subword_prefix"].fail("not supported (expected null)");
  if (!m.str_or("end_of_word_suffix", "").empty()) m["end_of_word_suffix"].fail("not supported (expected null)");
  const JsonAt vocab = m["vocab"];
  if (!vocab.value().is_object() || vocab.value().empty()) vocab.fail("expected a non-empty object of token: id");
  std::vector<std::pair<int64_t, JsonAt>> added;
  size_t n = vocab.size();
  if (root.has("added_tokens")) {
    const JsonAt at = root["added_tokens"];
    at.array();
    for (size_t i = 0; i < at.size(); ++i) {
      const JsonAt a = at.at(i);
      a.object();
      const int64_t id = a["id"].integer(0, kMaxId);
      added.emplace_back(id, a);
      n = std::max(n, size_t(id) + 1);
    }
  }
  t.id_to_token_.assign(n, std::string());
  t.types_.assign(n, TokenType::Unused);
  std::vector<bool> in_vocab(n, false);
  for (auto it = vocab.value().begin(); it != vocab.value().end(); ++it) {
    const JsonAt v(it.value(), path, vocab.child(it.key()));
    const int64_t id = v.integer(0, int64_t(n) - 1);
    if (in_vocab[size_t(id)])
      v.fail(fmt::format("id {} is also the id of '{}'", id, t.id_to_token_[size_t(id)]));
    in_vocab[size_t(id)] = true;
    t.id_to_token_[size_t(id)] = it.key();
    t.types_[size_t(id)] = TokenType::Normal;
  }
  std::unordered_map<std::string, int64_t> added_ids;
  for (const auto& [id, a] : added) {
    const std::string content = a["content"].str();
    if (content.empty()) a["content"].fail("expected a non-empty string");
    // An added token may repeat its own vocabulary entry; it may not replace another one.
    if ((in_vocab[size_t(id)] || t.types_[size_t(id)] != TokenType::Unused) && t.id_to_token_[size_t(id)] != content)
      a["id"].fail(fmt::format("id {} is already the token '{}', not '{}'", id, t.id_to_token_[size_t(id)], content));
    auto [it, fresh] = added_ids.emplace(content, id);
    if (!fresh && it->second != id) a["content"].fail(fmt::format("'{}' is already added with id {}", content, it->second));
    for (const char* k : {"lstrip", "rstrip", "single_word"})
      if (a.bool_or(k, false)) a[k].fail("true is not supported (expected false)");
    a.bool_or("normalized", false);  // no normalizer runs: type-checked only
    t.id_to_token_[size_t(id)] = content;
    t.types_[size_t(id)] = a.bool_or("special", false) ? TokenType::Control : TokenType::UserDefined;
  }
  auto vocab_id = [&](const std::string& s) -> int64_t {
    auto it = vocab.value().find(s);
    return it == vocab.value().end() ? -1 : it->get<int64_t>();
  };
  if (m.has("unk_token")) {
    const std::string u = m["unk_token"].str();
    t.unk_ = int32_t(vocab_id(u));
    if (t.unk_ < 0) m["unk_token"].fail("'" + u + "' is not in model.vocab");
  }
  // Merges: "left right" (exactly one space) or ["left", "right"]; as HF, both sides and
  // their concatenation must be in the vocabulary. A repeated merge takes its last rank, as HF.
  if (m.has("merges")) {
    const JsonAt merges = m["merges"];
    merges.array();
    for (size_t i = 0; i < merges.size(); ++i) {
      const JsonAt mg = merges.at(i);
      std::string l, r;
      if (mg.value().is_string()) {
        const std::string s = mg.str();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() || s.find(' ', sp + 1) != std::string::npos)
          mg.fail("expected \"left right\" (two tokens separated by one space), got " + json_describe(mg.value()));
        l = s.substr(0, sp);
        r = s.substr(sp + 1);
      } else if (mg.value().is_array() && mg.size() == 2) {
        l = mg.at(0).str();
        r = mg.at(1).str();
      } else {
        mg.fail("expected \"left right\" or a list of two strings, got " + json_describe(mg.value()));
      }
      for (const std::string& tok : {l, r, l + r})
        if (vocab_id(tok) < 0) mg.fail("'" + tok + "' is not in model.vocab");
      t.merge_rank_[l + " " + r] = int32_t(i);
    }
  }
  std::vector<std::string> res;
  bool byte_level = false;
  if (root.has("pre_tokenizer")) hf_pretok(root["pre_tokenizer"], res, byte_level);
  if (!byte_level)
    JsonAt(root.value().contains("pre_tokenizer") ? root.value()["pre_tokenizer"] : json(), path, "pre_tokenizer")
        .fail("expected a ByteLevel pre-tokenizer (last in a Sequence): only byte-level BPE is supported");
  t.regexes_ = res;
  t.pre_name_ = "tokenizer.json";
  if (root.has("decoder")) {
    const JsonAt d = root["decoder"];
    d.object();
    const std::string ty = d["type"].str();
    if (ty != "ByteLevel") d["type"].fail("'" + ty + "' is not supported (expected ByteLevel or null)");
  }
  // BOS from the post-processor template, if it prepends a special token.
  std::string post_bos;
  std::function<void(const JsonAt&, int)> post = [&](const JsonAt& p, int depth) {
    if (depth > 8) p.fail("Sequence nested more than 8 deep");
    p.object();
    const std::string ty = p["type"].str();
    if (ty == "Sequence") {
      const JsonAt ps = p["processors"];
      ps.array();
      for (size_t i = 0; i < ps.size(); ++i) post(ps.at(i), depth + 1);
    } else if (ty == "TemplateProcessing") {
      const JsonAt single = p["single"];
      single.array();
      for (size_t i = 0; i < single.size(); ++i) {
        const JsonAt piece = single.at(i);
        piece.object();
        if (piece.has("Sequence")) continue;
        if (!piece.has("SpecialToken")) piece.fail("expected a Sequence or a SpecialToken piece");
        if (i != 0) piece.fail("a special token after the text is not supported (only a leading BOS)");
        post_bos = piece["SpecialToken"]["id"].str();
        if (t.find_token_slow(post_bos) < 0) piece["SpecialToken"]["id"].fail("'" + post_bos + "' is not a token");
      }
    } else if (ty != "ByteLevel") {
      p["type"].fail("'" + ty + "' is not supported (expected TemplateProcessing, ByteLevel or Sequence)");
    }
  };
  if (root.has("post_processor")) post(root["post_processor"], 0);

  std::string cfg_path = (fs::path(dir) / "tokenizer_config.json").string();
  const json cfgj = path_exists(cfg_path, "tokenizer config") ? read_json_file(cfg_path, "tokenizer config", size_t(64) << 20)
                                                              : json::object();
  const JsonAt cfg(cfgj, cfg_path);
  cfg.object();
  auto resolve = [&](const char* key, const std::string& s) -> int32_t {
    if (s.empty()) return -1;
    const int32_t id = t.find_token_slow(s);
    if (id < 0) cfg[key].fail("'" + s + "' is not a token of " + path);
    return id;
  };
  const std::string bos = hf_token_field(cfg, "bos_token"), eos = hf_token_field(cfg, "eos_token");
  t.eos_ = resolve("eos_token", eos);
  t.bos_ = resolve("bos_token", bos);
  if (!post_bos.empty()) {
    t.bos_ = t.find_token_slow(post_bos);
    t.add_bos_ = true;
    t.pre_name_ += "+bos:" + post_bos;
  }
  if (cfg.has("add_bos_token")) t.add_bos_ = cfg["add_bos_token"].boolean();
  if (t.add_bos_ && t.bos_ < 0) {
    if (cfg.has("add_bos_token")) cfg["add_bos_token"].fail("true, but there is no bos_token");
    t.add_bos_ = false;
  }
  if (cfg.bool_or("add_eos_token", false)) cfg["add_eos_token"].fail("true is not supported (expected false)");
  if (cfg.has("chat_template")) {
    const JsonAt ct = cfg["chat_template"];
    if (ct.value().is_string()) {
      t.chat_template_ = ct.str();
    } else if (ct.value().is_array()) {
      // HF's named templates: [{"name": "default", "template": "..."}, ...]; serve "default".
      bool found = false;
      for (size_t i = 0; i < ct.size(); ++i) {
        const JsonAt e = ct.at(i);
        if (e["name"].str() == "default") {
          t.chat_template_ = e["template"].str();
          found = true;
        } else {
          e["template"].str();
        }
      }
      if (!found) ct.fail("a list of named templates without one named \"default\"");
    } else {
      ct.fail("expected a string or a list of {\"name\", \"template\"}, got " + json_describe(ct.value()));
    }
  }
  t.finalize(path, "model.vocab");
  return t;
}

int32_t Tokenizer::find_token_slow(const std::string& s) const {
  for (size_t i = 0; i < id_to_token_.size(); ++i)
    if (types_[i] != TokenType::Unused && id_to_token_[i] == s) return int32_t(i);
  return -1;
}

int32_t Tokenizer::find_token(const std::string& text) const {
  auto it = token_to_id_.find(text);
  return it == token_to_id_.end() ? -1 : it->second;
}

bool Tokenizer::is_eog(int32_t id) const { return std::find(eog_.begin(), eog_.end(), id) != eog_.end(); }

void Tokenizer::bpe(const std::string& word, std::vector<int32_t>& out) const {
  // word is already in the byte-unicode alphabet. Merges apply lowest rank first, leftmost
  // first among equal ranks. The symbols are a doubly linked list over word's code points
  // (a merge makes the left symbol absorb the right one); the candidate merges of adjacent
  // pairs sit in a min-heap ordered by (rank, left symbol index). An entry is stale when
  // either symbol was absorbed or grew since it was pushed (its byte length no longer
  // matches): O(n log n) in the word's length, as llama.cpp's llm_tokenizer_bpe.
  struct Sym {
    int32_t prev, next;
    uint32_t off, len;  // bytes of word
  };
  struct Cand {
    int32_t rank, left, right;
    uint32_t len;  // len(left) + len(right) when pushed
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  ATMOE_CHECK_INPUT(word.size() < (size_t(1) << 31), "tokenizer: a pre-token of {} bytes is too long", word.size());
  if (ignore_merges_) {
    auto it = token_to_id_.find(word);
    if (it != token_to_id_.end() && types_[size_t(it->second)] == TokenType::Normal) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<Sym> sym;
  for (size_t i = 0; i < word.size();) {
    size_t n = 1;
    const uint8_t c = uint8_t(word[i]);
    if (c >= 0xf0) n = 4;
    else if (c >= 0xe0) n = 3;
    else if (c >= 0xc0) n = 2;
    n = std::min(n, word.size() - i);
    const int32_t k = int32_t(sym.size());
    sym.push_back({k - 1, k + 1, uint32_t(i), uint32_t(n)});
    i += n;
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  std::string key;
  auto push = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    key.assign(word, sym[size_t(l)].off, sym[size_t(l)].len);
    key += ' ';
    key.append(word, sym[size_t(r)].off, sym[size_t(r)].len);
    auto it = merge_rank_.find(key);
    if (it != merge_rank_.end()) heap.push({it->second, l, r, sym[size_t(l)].len + sym[size_t(r)].len});
  };
  for (int32_t i = 0; i + 1 < int32_t(sym.size()); ++i) push(i, i + 1);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym &L = sym[size_t(c.left)], &R = sym[size_t(c.right)];
    if (L.len == 0 || R.len == 0 || L.next != c.right || L.len + R.len != c.len) continue;  // stale
    L.len += R.len;
    R.len = 0;
    L.next = R.next;
    if (R.next >= 0) sym[size_t(R.next)].prev = c.left;
    push(L.prev, c.left);
    push(c.left, L.next);
  }
  std::vector<std::string> merged;
  for (int32_t i = 0; i >= 0; i = sym[size_t(i)].next) merged.emplace_back(word, sym[size_t(i)].off, sym[size_t(i)].len);
  for (const auto& s : merged) {
    auto it = token_to_id_.find(s);
    if (it != token_to_id_.end()) {
      out.push_back(it->second);
      continue;
    }
    // Unknown symbol: fall back to its single byte-characters, then to <unk>.
    for (const auto& ch : utf8_chars(s)) {
      auto jt = token_to_id_.find(ch);
      if (jt != token_to_id_.end()) out.push_back(jt->second);
      else if (unk_ >= 0) out.push_back(unk_);
    }
  }
}

void Tokenizer::pretokenize_and_bpe(const std::string& raw, std::vector<int32_t>& out) const {
  // NFC first (HF normalizes the text outside added tokens); ASCII is already NFC, and
  // invalid UTF-8 (which no HF string can hold) is left as it is.
  std::string normalized;
  if (nfc_ && std::any_of(raw.begin(), raw.end(), [](char c) { return uint8_t(c) >= 0x80; })) {
    // utf8proc_map with the length (utf8proc_NFC would stop at a NUL byte).
    utf8proc_uint8_t* n = nullptr;
    const utf8proc_ssize_t len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(raw.data()), utf8proc_ssize_t(raw.size()),
                                              &n, utf8proc_option_t(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (len >= 0) normalized.assign(reinterpret_cast<const char*>(n), size_t(len));
    else normalized = raw;
    std::free(n);
  }
  const std::string& span = normalized.empty() ? raw : normalized;
  // Apply each regex in turn to every piece; matched and unmatched parts both stay pieces.
  std::vector<std::string> pieces{span};
  for (const auto& c : compiled_) {
    std::vector<std::string> next;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(c->code, nullptr);
    for (const auto& p : pieces) {
      PCRE2_SIZE start = 0, last = 0;
      // PCRE2 validates the whole subject as UTF-8 on every call unless told not to: check
      // it on the first call only (a UTF error there leaves the piece whole), else the scan
      // is quadratic in the piece's length.
      uint32_t opts = 0;
      while (start <= p.size()) {
        int rc = pcre2_match(c->code, reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(), start, opts, md, nullptr);
        if (rc == PCRE2_ERROR_NOMATCH || (rc < 0 && opts == 0 && rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21)) break;
        if (rc < 0) {
          pcre2_match_data_free(md);
          PCRE2_UCHAR buf[160];
          pcre2_get_error_message(rc, buf, sizeof buf);
          ATMOE_INPUT_ERROR("tokenizer: pre-tokenizer regex failed on a piece of {} bytes: {}", p.size(), reinterpret_cast<char*>(buf));
        }
        opts = PCRE2_NO_UTF_CHECK;
        PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        if (ov[0] > last) next.push_back(p.substr(last, ov[0] - last));
        if (ov[1] > ov[0]) next.push_back(p.substr(ov[0], ov[1] - ov[0]));
        last = ov[1];
        start = ov[1] > ov[0] ? ov[1] : ov[1] + 1;
        // Never restart inside a UTF-8 sequence after an empty match.
        while (start < p.size() && (uint8_t(p[start]) & 0xc0) == 0x80) ++start;
      }
      if (last < p.size()) next.push_back(p.substr(last));
    }
    pcre2_match_data_free(md);
    pieces.swap(next);
  }
  const auto& bm = byte_map();
  for (const auto& p : pieces) {
    std::string w;
    for (unsigned char ch : p) w += bm.to_uni[ch];
    bpe(w, out);
  }
}

std::vector<int32_t> Tokenizer::encode(const std::string& text, bool add_bos, bool parse_special) const {
  std::vector<int32_t> out;
  if (add_bos && bos_ >= 0) out.push_back(bos_);
  // Next occurrence of each special at or after pos, searched again only once passed: the
  // scan stays linear in the text however many specials it holds.
  std::vector<size_t> next_at(specials_.size(), 0);
  std::vector<bool> searched(specials_.size(), false);
  size_t pos = 0;
  while (pos < text.size()) {
    // Earliest special-token occurrence (longest at that position).
    size_t best_at = std::string::npos;
    int32_t best_id = -1;
    size_t best_len = 0;
    for (size_t k = 0; k < specials_.size(); ++k) {
      const auto& [s, id] = specials_[k];
      if (!parse_special && types_[size_t(id)] != TokenType::UserDefined) continue;
      if (!searched[k] || (next_at[k] != std::string::npos && next_at[k] < pos)) {
        next_at[k] = text.find(s, pos);
        searched[k] = true;
      }
      const size_t at = next_at[k];
      if (at == std::string::npos) continue;
      if (at < best_at || (at == best_at && s.size() > best_len)) {
        best_at = at;
        best_id = id;
        best_len = s.size();
      }
    }
    size_t end = best_at == std::string::npos ? text.size() : best_at;
    if (end > pos) pretokenize_and_bpe(text.substr(pos, end - pos), out);
    if (best_id < 0) break;
    out.push_back(best_id);
    pos = best_at + best_len;
  }
  return out;
}

std::string Tokenizer::token_bytes(int32_t id, bool render_special) const {
  if (id < 0 || id >= vocab_size()) return {};
  TokenType ty = types_[size_t(id)];
  const std::string& s = id_to_token_[size_t(id)];
  if (ty == TokenType::Control || ty == TokenType::Unknown) return render_special ? s : std::string();
  if (ty == TokenType::UserDefined) return s;
  const auto& bm = byte_map();
  std::string r;
  for (const auto& ch : utf8_chars(s)) {
    auto it = bm.from_uni.find(ch);
    if (it != bm.from_uni.end()) r.push_back(char(it->second));
    else r += ch;
  }
  return r;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool render_special) const {
  std::string r;
  for (auto id : ids) r += token_bytes(id, render_special);
  return r;
}

std::string Tokenizer::summary() const {
  size_t ctrl = 0;
  for (auto t : types_) ctrl += t == TokenType::Control;
  return fmt::format("byte-level BPE, vocab={} merges={} control={} pre={} bos={} eos={} add_bos={} eog=[{}] chat_template={}",
                     vocab_size(), merge_rank_.size(), ctrl, pre_name_,
                     bos_ >= 0 ? id_to_token_[size_t(bos_)] : "none", eos_ >= 0 ? id_to_token_[size_t(eos_)] : "none",
                     add_bos_, fmt::join(eog_, ","), chat_template_.empty() ? "none" : "present");
}

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_.token_bytes(id);
  size_t n = utf8_complete_prefix(pending_);
  std::string out = utf8_sanitize(pending_.substr(0, n));
  pending_.erase(0, n);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = utf8_sanitize(pending_);  // a sequence left incomplete at the end becomes U+FFFD
  pending_.clear();
  return out;
}

}  // namespace atmoe
