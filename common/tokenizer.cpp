#include "common/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

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

void Tokenizer::finalize(const std::string& src) {
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
  const auto& merges = f.get_arr("tokenizer.ggml.merges");
  for (size_t i = 0; i < merges.size(); ++i) {
    ATMOE_CHECK_INPUT(merges[i].kind == GgufValue::STRING, "{}: tokenizer.ggml.merges must hold strings", src);
    t.merge_rank_.emplace(merges[i].s, int32_t(i));
  }
  auto id_or = [&](const char* k) { return f.has(k) ? int32_t(std::min<uint64_t>(f.get_uint(k), INT32_MAX)) : -1; };
  t.bos_ = id_or("tokenizer.ggml.bos_token_id");
  t.eos_ = id_or("tokenizer.ggml.eos_token_id");
  t.unk_ = id_or("tokenizer.ggml.unknown_token_id");
  t.pre_name_ = f.has("tokenizer.ggml.pre") ? f.get_str("tokenizer.ggml.pre") : "gpt2";
  t.add_bos_ = f.get_bool("tokenizer.ggml.add_bos_token", t.pre_name_ == "llama-bpe");
  if (f.has("tokenizer.chat_template")) t.chat_template_ = f.get_str("tokenizer.chat_template");
  t.regexes_ = regexes_for_pre(t.pre_name_, src);
  t.finalize(src);
  int32_t eot = id_or("tokenizer.ggml.eot_token_id");
  if (eot >= 0 && eot < t.vocab_size() && std::find(t.eog_.begin(), t.eog_.end(), eot) == t.eog_.end()) t.eog_.push_back(eot);
  return t;
}

// Collects the regex sequence of an HF pre_tokenizer spec.
static void hf_pretok(const json& p, const std::string& src, std::vector<std::string>& out) {
  if (p.is_null()) return;
  ATMOE_CHECK_INPUT(p.is_object() && p.contains("type"), "{}: pre_tokenizer must be an object with 'type'", src);
  std::string ty = p["type"].get<std::string>();
  if (ty == "Sequence") {
    for (const auto& q : p.value("pretokenizers", json::array())) hf_pretok(q, src, out);
  } else if (ty == "Digits") {
    ATMOE_CHECK_INPUT(p.value("individual_digits", false), "{}: Digits pre-tokenizer without individual_digits unsupported", src);
    out.push_back(kDigitRe);
  } else if (ty == "ByteLevel") {
    if (p.value("use_regex", true)) out.push_back(kGpt2Re);
  } else if (ty == "Split") {
    ATMOE_CHECK_INPUT(p.contains("pattern") && p["pattern"].contains("Regex"), "{}: Split pre-tokenizer needs a Regex pattern", src);
    out.push_back(p["pattern"]["Regex"].get<std::string>());
  } else {
    ATMOE_INPUT_ERROR("{}: pre_tokenizer type '{}' is not supported", src, ty);
  }
}

Tokenizer Tokenizer::from_hf_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  std::string path = (fs::path(dir) / "tokenizer.json").string();
  ATMOE_CHECK_INPUT(path_exists(path, "tokenizer"), "{}: missing tokenizer (tokenizer.json not found)", path);
  json j = read_json_file(path, "tokenizer", size_t(256) << 20);
  Tokenizer t;
  try {
    const json& m = j.at("model");
    std::string type = m.value("type", std::string("BPE"));
    ATMOE_CHECK_INPUT(type == "BPE", "{}: model.type '{}' is not supported (expected BPE)", path, type);
    const json& vocab = m.at("vocab");
    ATMOE_CHECK_INPUT(vocab.is_object() && !vocab.empty(), "{}: model.vocab must be a non-empty object", path);
    size_t n = vocab.size();
    for (const auto& a : j.value("added_tokens", json::array())) n = std::max(n, size_t(a.at("id").get<int64_t>()) + 1);
    ATMOE_CHECK_INPUT(n <= (1u << 22), "{}: vocabulary of {} entries is too large", path, n);
    t.id_to_token_.assign(n, std::string());
    t.types_.assign(n, TokenType::Unused);
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      int64_t id = it.value().get<int64_t>();
      ATMOE_CHECK_INPUT(id >= 0 && size_t(id) < n, "{}: model.vocab['{}'] = {} out of range", path, it.key(), id);
      t.id_to_token_[size_t(id)] = it.key();
      t.types_[size_t(id)] = TokenType::Normal;
    }
    for (const auto& a : j.value("added_tokens", json::array())) {
      int64_t id = a.at("id").get<int64_t>();
      ATMOE_CHECK_INPUT(id >= 0, "{}: added_tokens id {} negative", path, id);
      t.id_to_token_[size_t(id)] = a.at("content").get<std::string>();
      t.types_[size_t(id)] = a.value("special", false) ? TokenType::Control : TokenType::UserDefined;
    }
    const json& merges = m.value("merges", json::array());
    int32_t rank = 0;
    for (const auto& mg : merges) {
      std::string key = mg.is_string() ? mg.get<std::string>() : mg.at(0).get<std::string>() + " " + mg.at(1).get<std::string>();
      t.merge_rank_.emplace(key, rank++);
    }
    std::vector<std::string> res;
    hf_pretok(j.value("pre_tokenizer", json()), path, res);
    if (res.empty()) res.push_back(kGpt2Re);
    t.regexes_ = res;
    t.pre_name_ = "tokenizer.json";
    // BOS from the post-processor template, if it prepends a special token.
    std::function<void(const json&)> post = [&](const json& p) {
      if (!p.is_object()) return;
      std::string ty = p.value("type", std::string());
      if (ty == "Sequence") {
        for (const auto& q : p.value("processors", json::array())) post(q);
      } else if (ty == "TemplateProcessing") {
        const json& single = p.value("single", json::array());
        if (!single.empty() && single[0].contains("SpecialToken")) {
          std::string s = single[0]["SpecialToken"].at("id").get<std::string>();
          t.add_bos_ = true;
          t.bos_ = -2;  // resolved below
          t.pre_name_ += "+bos:" + s;
        }
      }
    };
    post(j.value("post_processor", json()));
  } catch (const json::exception& e) {
    ATMOE_INPUT_ERROR("{}: malformed tokenizer ({})", path, e.what());
  }
  std::string cfg_path = (fs::path(dir) / "tokenizer_config.json").string();
  json cfg = path_exists(cfg_path, "tokenizer config") ? read_json_file(cfg_path, "tokenizer config", size_t(64) << 20) : json::object();
  ATMOE_CHECK_INPUT(cfg.is_object(), "{}: expected a JSON object", cfg_path);
  auto tok_field = [&](const char* k) -> std::string {
    if (!cfg.contains(k)) return {};
    const json& v = cfg[k];
    if (v.is_string()) return v.get<std::string>();
    if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
    return {};
  };
  Tokenizer* tp = &t;
  auto lookup = [&](const std::string& s) {
    for (size_t i = 0; i < tp->id_to_token_.size(); ++i)
      if (tp->id_to_token_[i] == s) return int32_t(i);
    return int32_t(-1);
  };
  std::string bos = tok_field("bos_token"), eos = tok_field("eos_token");
  size_t plus = t.pre_name_.find("+bos:");
  if (plus != std::string::npos) bos = t.pre_name_.substr(plus + 5);
  t.bos_ = bos.empty() ? -1 : lookup(bos);
  if (t.bos_ < 0) t.add_bos_ = false;
  t.eos_ = eos.empty() ? -1 : lookup(eos);
  if (cfg.contains("chat_template") && cfg["chat_template"].is_string()) t.chat_template_ = cfg["chat_template"].get<std::string>();
  if (cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean()) t.add_bos_ = cfg["add_bos_token"].get<bool>() && t.bos_ >= 0;
  t.finalize(path);
  return t;
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

void Tokenizer::pretokenize_and_bpe(const std::string& span, std::vector<int32_t>& out) const {
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
        if (rc < 0) break;
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
