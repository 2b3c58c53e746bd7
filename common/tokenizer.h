// Byte-level BPE tokenizer (GPT-2 family: SmolLM2, Llama-3, Qwen2), loaded from an HF
// tokenizer.json or from GGUF metadata (tokenizer.ggml.*).
//
// encode(text):
//   1. split out special/added tokens (longest match first; with parse_special=false
//      only user-defined added tokens are split out, as llama.cpp does);
//   2. pre-tokenize each remaining span with the model's regex sequence (PCRE2, UTF+UCP);
//   3. map bytes to the GPT-2 byte-unicode alphabet and apply BPE merges by rank.
// decode: inverse byte map; control tokens render as "" unless render_special.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace atmoe {

class GgufFile;

enum class TokenType : uint8_t { Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6 };

class Tokenizer {
 public:
  static Tokenizer from_gguf(const GgufFile& f);
  static Tokenizer from_hf_dir(const std::string& dir);  // tokenizer.json (+ tokenizer_config.json)
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  std::vector<int32_t> encode(const std::string& text, bool add_bos, bool parse_special = true) const;
  std::string decode(const std::vector<int32_t>& ids, bool render_special = false) const;
  std::string token_bytes(int32_t id, bool render_special = false) const;  // raw bytes of one token

  int32_t vocab_size() const { return int32_t(id_to_token_.size()); }
  // Bytes of the longest token: a text of n bytes encodes to at least n / max_token_bytes() tokens.
  size_t max_token_bytes() const { return max_token_bytes_; }
  // NFC (the normalizer of Qwen2's tokenizer.json) may shrink text up to 3x before encoding.
  bool normalizes() const { return nfc_; }
  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }
  bool add_bos_default() const { return add_bos_; }
  bool is_eog(int32_t id) const;            // end-of-generation tokens
  const std::vector<int32_t>& eog_ids() const { return eog_; }
  int32_t find_token(const std::string& text) const;  // -1 when absent
  TokenType type(int32_t id) const { return types_.at(size_t(id)); }
  const std::string& token_text(int32_t id) const { return id_to_token_.at(size_t(id)); }
  const std::string& chat_template() const { return chat_template_; }
  const std::string& pre_name() const { return pre_name_; }
  std::string summary() const;

 private:
  Tokenizer();
  void finalize(const std::string& src, const char* vocab_field);
  void bpe(const std::string& word, std::vector<int32_t>& out) const;
  void pretokenize_and_bpe(const std::string& span, std::vector<int32_t>& out) const;
  int32_t find_token_slow(const std::string& s) const;  // before finalize(): a linear scan

  std::vector<std::string> id_to_token_;
  std::vector<TokenType> types_;
  std::unordered_map<std::string, int32_t> token_to_id_;
  std::unordered_map<std::string, int32_t> merge_rank_;  // "left right" -> rank
  std::vector<std::pair<std::string, int32_t>> specials_;  // sorted longest first
  std::vector<std::string> regexes_;
  struct Compiled;
  std::vector<std::unique_ptr<Compiled>> compiled_;
  std::string pre_name_, chat_template_;
  int32_t bos_ = -1, eos_ = -1, unk_ = -1;
  bool add_bos_ = false;
  bool nfc_ = false;            // tokenizer.json normalizer NFC (Qwen2): applied outside added tokens
  bool ignore_merges_ = false;  // a pre-token that is itself a (normal) token is emitted whole (HF, llama.cpp llama3)
  size_t max_token_bytes_ = 1;
  std::vector<int32_t> eog_;
};

// Streaming detokenisation: push token ids, get valid UTF-8 that never ends inside a
// sequence (a sequence still incomplete is held back; bytes that can never form one become
// U+FFFD); flush() returns what is left at the end, an unfinished sequence as U+FFFD.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& t) : tok_(t) {}
  std::string push(int32_t id);
  std::string flush();

 private:
  const Tokenizer& tok_;
  std::string pending_;
};

}  // namespace atmoe
