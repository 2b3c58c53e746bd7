#include "common/model_config.h"

#include <cmath>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_reader.h"
#include "common/gguf.h"

namespace atmoe {
using json = nlohmann::json;

void ModelConfig::validate(const std::string& src) const {
  ATMOE_CHECK_INPUT(n_layers > 0 && n_layers <= 1024, "{}: num_hidden_layers {} out of range (1..1024)", src, n_layers);
  ATMOE_CHECK_INPUT(hidden > 0 && hidden <= 65536, "{}: hidden_size {} out of range", src, hidden);
  ATMOE_CHECK_INPUT(n_heads > 0 && n_heads <= 1024, "{}: num_attention_heads {} out of range", src, n_heads);
  ATMOE_CHECK_INPUT(n_kv_heads > 0 && n_heads % n_kv_heads == 0,
                    "{}: num_key_value_heads {} must divide num_attention_heads {}", src, n_kv_heads, n_heads);
  ATMOE_CHECK_INPUT(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024, "{}: head_dim {} must be even and positive", src, head_dim);
  ATMOE_CHECK_INPUT(ffn > 0 && ffn <= 1 << 20, "{}: intermediate_size {} out of range", src, ffn);
  ATMOE_CHECK_INPUT(vocab > 0 && vocab <= 1 << 22, "{}: vocab_size {} out of range", src, vocab);
  ATMOE_CHECK_INPUT(rms_eps > 0 && rms_eps < 1, "{}: rms_norm_eps {} out of range", src, rms_eps);
  ATMOE_CHECK_INPUT(rope_theta > 0, "{}: rope_theta must be positive", src);
  ATMOE_CHECK_INPUT(max_position > 0, "{}: max_position_embeddings must be positive", src);
}

std::string ModelConfig::summary() const {
  std::ostringstream o;
  o << "arch=" << arch << " layers=" << n_layers << " hidden=" << hidden << " heads=" << n_heads
    << " kv_heads=" << n_kv_heads << " head_dim=" << head_dim << " ffn=" << ffn << " vocab=" << vocab
    << " ctx=" << max_position << " rope_theta=" << rope_theta << " rms_eps=" << rms_eps
    << " tied=" << (tie_embeddings ? "yes" : "no") << " qkv_bias=" << (qkv_bias ? "yes" : "no")
    << " rope=" << (rope_style == RopeStyle::Neox ? "neox" : "interleaved");
  if (!rope_scaling.type.empty()) o << " rope_scaling=" << rope_scaling.type << "(x" << rope_scaling.factor << ")";
  return o.str();
}

static int get_int(const json& j, const char* key, const std::string& path, int def, bool required) {
  if (!j.contains(key) || j[key].is_null()) {
    ATMOE_CHECK_INPUT(!required, "{}: missing field '{}'", path, key);
    return def;
  }
  ATMOE_CHECK_INPUT(j[key].is_number_integer(), "{}: field '{}' must be an integer", path, key);
  int64_t v = j[key].get<int64_t>();
  ATMOE_CHECK_INPUT(v >= 0 && v <= (1ll << 30), "{}: field '{}' = {} out of range", path, key, v);
  return int(v);
}
static double get_num(const json& j, const char* key, const std::string& path, double def) {
  if (!j.contains(key) || j[key].is_null()) return def;
  ATMOE_CHECK_INPUT(j[key].is_number() && std::isfinite(j[key].get<double>()), "{}: field '{}' must be a finite number", path, key);
  return j[key].get<double>();
}

ModelConfig config_from_hf_json(const std::string& path) {
  const json j = read_json_file(path, "model config", size_t(16) << 20);
  ATMOE_CHECK_INPUT(j.is_object(), "{}: expected a JSON object", path);
  ModelConfig c;
  ATMOE_CHECK_INPUT(j.contains("model_type") && j["model_type"].is_string(), "{}: missing string field 'model_type'", path);
  c.arch = j["model_type"].get<std::string>();
  ATMOE_CHECK_INPUT(c.arch == "llama" || c.arch == "mistral" || c.arch == "qwen2",
                    "{}: model_type '{}' is not supported (expected llama, mistral or qwen2)", path, c.arch);
  c.hidden = get_int(j, "hidden_size", path, 0, true);
  c.n_layers = get_int(j, "num_hidden_layers", path, 0, true);
  c.n_heads = get_int(j, "num_attention_heads", path, 0, true);
  c.n_kv_heads = get_int(j, "num_key_value_heads", path, c.n_heads, false);
  c.ffn = get_int(j, "intermediate_size", path, 0, true);
  c.vocab = get_int(j, "vocab_size", path, 0, true);
  c.max_position = get_int(j, "max_position_embeddings", path, 2048, false);
  c.head_dim = get_int(j, "head_dim", path, c.n_heads ? c.hidden / c.n_heads : 0, false);
  c.rms_eps = get_num(j, "rms_norm_eps", path, 1e-6);
  c.rope_theta = get_num(j, "rope_theta", path, 10000.0);
  const JsonAt root(j, path);
  c.tie_embeddings = root.bool_or("tie_word_embeddings", false);
  // Mistral's sliding-window attention equals full attention up to the window: serve
  // contexts up to the window only, rather than produce different results past it.
  const bool window_on = !j.contains("use_sliding_window") || j["use_sliding_window"] == true;
  if (window_on && j.contains("sliding_window") && j["sliding_window"].is_number_integer()) {
    int64_t w = j["sliding_window"].get<int64_t>();
    if (w > 0 && w < c.max_position) c.max_position = int(w);
  }
  c.qkv_bias = c.arch == "qwen2" ? true : root.bool_or("attention_bias", false);
  c.rope_style = RopeStyle::Neox;
  if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) {
    const json& rs = j["rope_scaling"];
    const JsonAt rsa = root["rope_scaling"];
    std::string t = rsa.str_or("rope_type", rsa.str_or("type", std::string()));
    ATMOE_CHECK_INPUT(t == "llama3" || t == "linear" || t == "default",
                      "{}: rope_scaling type '{}' is not supported (expected llama3 or linear)", path, t);
    if (t != "default") {
      c.rope_scaling.type = t;
      c.rope_scaling.factor = get_num(rs, "factor", path, 1.0);
      c.rope_scaling.low_freq_factor = get_num(rs, "low_freq_factor", path, 1.0);
      c.rope_scaling.high_freq_factor = get_num(rs, "high_freq_factor", path, 4.0);
      c.rope_scaling.original_max_position = get_num(rs, "original_max_position_embeddings", path, 8192);
      ATMOE_CHECK_INPUT(c.rope_scaling.factor > 0, "{}: rope_scaling.factor must be positive", path);
      ATMOE_CHECK_INPUT(t != "llama3" || c.rope_scaling.high_freq_factor > c.rope_scaling.low_freq_factor,
                        "{}: rope_scaling: high_freq_factor must exceed low_freq_factor", path);
    }
  }
  c.validate(path);
  return c;
}

ModelConfig config_from_gguf(const GgufFile& f) {
  ModelConfig c;
  std::string a = f.get_str("general.architecture");
  ATMOE_CHECK_INPUT(a == "llama" || a == "qwen2", "{}: general.architecture '{}' is not supported (expected llama or qwen2)",
                    f.path(), a);
  c.arch = a;
  auto u = [&](const std::string& k) { return int(std::min<uint64_t>(f.get_uint(a + "." + k), 1u << 30)); };
  c.n_layers = u("block_count");
  c.hidden = u("embedding_length");
  c.ffn = u("feed_forward_length");
  c.n_heads = u("attention.head_count");
  c.n_kv_heads = f.has(a + ".attention.head_count_kv") ? u("attention.head_count_kv") : c.n_heads;
  c.max_position = f.has(a + ".context_length") ? u("context_length") : 2048;
  c.rope_theta = f.has(a + ".rope.freq_base") ? f.get_float(a + ".rope.freq_base") : 10000.0;
  c.rms_eps = f.get_float(a + ".attention.layer_norm_rms_epsilon");
  c.head_dim = f.has(a + ".attention.key_length") ? u("attention.key_length") : (c.n_heads ? c.hidden / c.n_heads : 0);
  if (f.has(a + ".vocab_size")) c.vocab = u("vocab_size");
  else if (f.has("tokenizer.ggml.tokens")) c.vocab = int(f.get_arr("tokenizer.ggml.tokens").size());
  c.tie_embeddings = f.tensor("output.weight") == nullptr;
  c.qkv_bias = f.tensor("blk.0.attn_q.bias") != nullptr;
  c.rope_style = a == "llama" ? RopeStyle::Interleaved : RopeStyle::Neox;
  if (f.has(a + ".rope.scaling.type")) {
    std::string t = f.get_str(a + ".rope.scaling.type");
    if (t == "linear") {
      c.rope_scaling.type = "linear";
      c.rope_scaling.factor = f.get_float(a + ".rope.scaling.factor");
    } else {
      ATMOE_CHECK_INPUT(t == "none", "{}: rope scaling type '{}' is not supported", f.path(), t);
    }
  }
  // llama3-style scaling is stored in GGUF as the tensor rope_freqs.weight (applied by the loader).
  c.validate(f.path());
  return c;
}

std::vector<float> rope_inv_freq(const ModelConfig& c) {
  int half = c.head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) {
    double freq = std::pow(c.rope_theta, -2.0 * i / c.head_dim);
    const auto& s = c.rope_scaling;
    if (s.type == "linear") {
      freq /= s.factor;
    } else if (s.type == "llama3") {
      double low_wl = s.original_max_position / s.low_freq_factor;
      double high_wl = s.original_max_position / s.high_freq_factor;
      double wl = 2 * M_PI / freq;
      if (wl < high_wl) {
      } else if (wl > low_wl) {
        freq /= s.factor;
      } else {
        double smooth = (s.original_max_position / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        freq = (1 - smooth) * freq / s.factor + smooth * freq;
      }
    }
    inv[size_t(i)] = float(freq);
  }
  return inv;
}

}  // namespace atmoe
