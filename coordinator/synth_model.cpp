#include "coordinator/synth_model.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "common/utf8.h"

namespace atmoe {
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {
const char* kCorpus =
    "The quick brown fox jumps over the lazy dog. A model of experts answers questions about medicine, "
    "law and support. Routing sends each token to the experts that know the task best. The router is a small "
    "linear layer with a softmax over groups and a softmax over the experts inside each group. Tests are "
    "deterministic: the same seed gives the same model, the same tokenizer and the same answers. 0123456789 "
    "Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital.";

std::vector<std::string> byte_alphabet() {
  std::vector<std::string> a(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    utf8_append(a[size_t(b)], keep ? uint32_t(b) : uint32_t(256 + n++));
  }
  return a;
}
}  // namespace

void synth_model(const SynthModelOptions& o) {
  ATMOE_CHECK_INPUT(!o.out.empty(), "synth-model: --out is required");
  ATMOE_CHECK_INPUT(o.layers >= 1 && o.layers <= 64, "synth-model: --layers {} must be in 1..64", o.layers);
  ATMOE_CHECK_INPUT(o.hidden >= 2 && o.hidden <= 4096, "synth-model: --hidden {} must be in 2..4096", o.hidden);
  ATMOE_CHECK_INPUT(o.heads >= 1 && o.heads <= 256 && o.kv_heads >= 1 && o.kv_heads <= 256,
                    "synth-model: --heads {} and --kv-heads {} must be in 1..256", o.heads, o.kv_heads);
  ATMOE_CHECK_INPUT(o.ffn >= 1 && o.ffn <= 16384, "synth-model: --ffn {} must be in 1..16384", o.ffn);
  ATMOE_CHECK_INPUT(o.max_position >= 1 && o.max_position <= (1 << 20), "synth-model: --max-position {} must be in 1..1048576",
                    o.max_position);
  ATMOE_CHECK_INPUT(o.hidden % o.heads == 0 && (o.hidden / o.heads) % 2 == 0,
                    "synth-model: --hidden {} must be a multiple of --heads {} with an even head_dim", o.hidden, o.heads);
  ATMOE_CHECK_INPUT(o.heads % o.kv_heads == 0, "synth-model: --kv-heads {} must divide --heads {}", o.kv_heads, o.heads);
  ATMOE_CHECK_INPUT(o.arch == "llama" || o.arch == "qwen2", "synth-model: --arch '{}': expected llama or qwen2", o.arch);
  ATMOE_CHECK_INPUT(o.vocab >= 259 && o.vocab <= 65536, "synth-model: --vocab {} must be in [259, 65536]", o.vocab);
  fs::create_directories(o.out);

  // Tokenizer: byte alphabet, then BPE merges learned greedily from the corpus.
  auto alpha = byte_alphabet();
  std::vector<std::string> vocab(alpha.begin(), alpha.end());
  std::vector<std::vector<std::string>> words;
  {
    std::string text = kCorpus;
    size_t i = 0;
    while (i < text.size()) {
      size_t j = text.find(' ', i + 1);
      if (j == std::string::npos) j = text.size();
      std::vector<std::string> w;
      for (size_t k = i; k < j; ++k) w.push_back(alpha[uint8_t(text[k])]);
      words.push_back(w);
      i = j;
    }
  }
  const int n_special = 3;
  std::vector<std::string> merges;
  while (int(vocab.size()) + n_special < o.vocab) {
    std::map<std::pair<std::string, std::string>, int> cnt;
    for (auto& w : words)
      for (size_t k = 0; k + 1 < w.size(); ++k) cnt[{w[k], w[k + 1]}]++;
    if (cnt.empty()) break;
    auto best = std::max_element(cnt.begin(), cnt.end(), [](auto& a, auto& b) { return a.second < b.second; });
    if (best->second < 2) break;
    auto [l, r] = best->first;
    merges.push_back(l + " " + r);
    vocab.push_back(l + r);
    for (auto& w : words) {
      std::vector<std::string> nw;
      for (size_t k = 0; k < w.size(); ++k) {
        if (k + 1 < w.size() && w[k] == l && w[k + 1] == r) {
          nw.push_back(l + r);
          ++k;
        } else {
          nw.push_back(w[k]);
        }
      }
      w.swap(nw);
    }
  }
  // Fill up to the requested size with unused placeholder tokens so vocab == config.
  while (int(vocab.size()) + n_special < o.vocab) vocab.push_back("<|unused_" + std::to_string(vocab.size()) + "|>");
  const char* specials[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  json jv = json::object();
  for (size_t i = 0; i < vocab.size(); ++i) jv[vocab[i]] = i;
  json added = json::array();
  for (int k = 0; k < n_special; ++k) {
    size_t id = vocab.size() + size_t(k);
    jv[specials[k]] = id;
    added.push_back({{"id", id}, {"content", specials[k]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  }
  json tj = {{"version", "1.0"},
             {"added_tokens", added},
             {"normalizer", nullptr},
             {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
             {"post_processor", nullptr},
             {"decoder", {{"type", "ByteLevel"}}},
             {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"vocab", jv}, {"merges", merges}}}};
  write_file((fs::path(o.out) / "tokenizer.json").string(), tj.dump(1), "synth output");
  json tc = {{"bos_token", nullptr},
             {"eos_token", "<|im_end|>"},
             {"add_bos_token", false},
             {"chat_template",
              "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"}};
  write_file((fs::path(o.out) / "tokenizer_config.json").string(), tc.dump(1), "synth output");

  const int D = o.hidden / o.heads;
  json cfg = {{"architectures", {o.arch == "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
              {"model_type", o.arch},
              {"hidden_size", o.hidden},
              {"intermediate_size", o.ffn},
              {"num_hidden_layers", o.layers},
              {"num_attention_heads", o.heads},
              {"num_key_value_heads", o.kv_heads},
              {"head_dim", D},
              {"vocab_size", o.vocab},
              {"max_position_embeddings", o.max_position},
              {"rms_norm_eps", 1e-5},
              {"rope_theta", 10000.0},
              {"tie_word_embeddings", o.tie_embeddings},
              {"hidden_act", "silu"},
              {"torch_dtype", "float32"},
              {"bos_token_id", nullptr},
              {"eos_token_id", int(vocab.size()) + 2}};
  write_file((fs::path(o.out) / "config.json").string(), cfg.dump(1), "synth output");

  // Weights.
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<float> nd(0.f, 0.02f);
  std::vector<std::vector<float>> store;
  std::vector<SafetensorsWriteItem> items;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, bool ones) {
    size_t n = 1;
    for (auto d : shape) n *= size_t(d);
    store.emplace_back(n);
    auto& v = store.back();
    // Norm weights near 1 (not exactly: a test must notice a norm weight that is ignored).
    for (auto& x : v) x = ones ? 1.f + nd(rng) : nd(rng);
    items.push_back({name, DType::F32, shape, nullptr});
  };
  store.reserve(size_t(4 + o.layers * 12));
  add("model.embed_tokens.weight", {o.vocab, o.hidden}, false);
  for (int l = 0; l < o.layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {o.hidden}, true);
    add(p + "self_attn.q_proj.weight", {o.heads * D, o.hidden}, false);
    add(p + "self_attn.k_proj.weight", {o.kv_heads * D, o.hidden}, false);
    add(p + "self_attn.v_proj.weight", {o.kv_heads * D, o.hidden}, false);
    if (o.arch == "qwen2") {
      add(p + "self_attn.q_proj.bias", {o.heads * D}, false);
      add(p + "self_attn.k_proj.bias", {o.kv_heads * D}, false);
      add(p + "self_attn.v_proj.bias", {o.kv_heads * D}, false);
    }
    add(p + "self_attn.o_proj.weight", {o.hidden, o.heads * D}, false);
    add(p + "post_attention_layernorm.weight", {o.hidden}, true);
    add(p + "mlp.gate_proj.weight", {o.ffn, o.hidden}, false);
    add(p + "mlp.up_proj.weight", {o.ffn, o.hidden}, false);
    add(p + "mlp.down_proj.weight", {o.hidden, o.ffn}, false);
  }
  add("model.norm.weight", {o.hidden}, true);
  if (!o.tie_embeddings) add("lm_head.weight", {o.vocab, o.hidden}, false);
  for (size_t i = 0; i < items.size(); ++i) items[i].data = store[i].data();
  write_safetensors((fs::path(o.out) / "model.safetensors").string(), items, {{"format", "pt"}});
}

}  // namespace atmoe
