#include "common/model_config.h"

#include <cmath>
#include <cstdint>
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
  ATMOE_CHECK_INPUT(std::isfinite(rms_eps) && rms_eps > 0 && rms_eps < 1, "{}: rms_norm_eps {} out of range (0, 1)", src, rms_eps);
  ATMOE_CHECK_INPUT(std::isfinite(rope_theta) && rope_theta > 0, "{}: rope_theta {} must be finite and positive", src, rope_theta);
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

ModelConfig config_from_hf_json(const std::string& path) {
  const json j = read_json_file(path, "model config", size_t(16) << 20);
  const JsonAt root(j, path);
  root.object();
  ModelConfig c;
  c.arch = root["model_type"].str();
  ATMOE_CHECK_INPUT(c.arch == "llama" || c.arch == "mistral" || c.arch == "qwen2",
                    "{}: model_type '{}' is not supported (expected llama, mistral or qwen2)", path, c.arch);
  const int64_t kMax = int64_t(1) << 30;
  auto req = [&](const char* k) { return int(root[k].integer(0, kMax)); };
  c.hidden = req("hidden_size");
  c.n_layers = req("num_hidden_layers");
  c.n_heads = req("num_attention_heads");
  c.n_kv_heads = int(root.int_or("num_key_value_heads", c.n_heads, 0, kMax));
  c.ffn = req("intermediate_size");
  c.vocab = req("vocab_size");
  c.max_position = int(root.int_or("max_position_embeddings", 2048, 0, kMax));
  c.head_dim = int(root.int_or("head_dim", c.n_heads ? c.hidden / c.n_heads : 0, 0, kMax));
  c.rms_eps = root.num_or("rms_norm_eps", 1e-6, 0, 1);
  c.rope_theta = root.num_or("rope_theta", 10000.0, 0, 1e30);
  c.tie_embeddings = root.bool_or("tie_word_embeddings", false);
  // The MLP is SwiGLU: gate with SiLU, no biases.
  if (root.has("hidden_act")) {
    const std::string act = root["hidden_act"].str();
    if (act != "silu") root["hidden_act"].fail("'" + act + "' is not supported (expected silu)");
  }
  if (root.bool_or("mlp_bias", false)) root["mlp_bias"].fail("MLP biases are not supported (expected false)");
  if (root.num_or("partial_rotary_factor", 1.0, 0, 1) != 1.0)
    root["partial_rotary_factor"].fail("partial rotary embeddings are not supported (expected 1)");
  if (root.has("quantization_config"))
    root["quantization_config"].fail("quantized checkpoints are not supported (expected F32, F16 or BF16 weights)");
  // Sliding-window attention equals full attention up to the window: serve contexts up to
  // the window only, rather than produce different results past it. Mistral applies the
  // window unless use_sliding_window is false; Qwen2 only when it is true (HF's default
  // there is false); Llama has no sliding window.
  const bool use_sw = root.bool_or("use_sliding_window", c.arch == "mistral");
  if (root.has("sliding_window")) {
    const int64_t w = root["sliding_window"].integer(1, INT64_MAX);
    if (w < 1) root["sliding_window"].fail(fmt::format("expected an integer in 1..{}, got {}", INT64_MAX, w));
    if (c.arch != "llama" && use_sw && w < c.max_position) c.max_position = int(w);
  }
  c.qkv_bias = c.arch == "qwen2" ? true : root.bool_or("attention_bias", false);
  c.rope_style = RopeStyle::Neox;
  if (root.has("rope_scaling")) {
    const JsonAt rs = root["rope_scaling"];
    rs.object();
    const std::string t = rs.has("rope_type") ? rs["rope_type"].str() : rs.has("type") ? rs["type"].str() : "";
    if (t != "llama3" && t != "linear" && t != "default")
      rs.fail("type '" + t + "' is not supported (expected llama3, linear or default)");
    if (t != "default") {
      c.rope_scaling.type = t;
      c.rope_scaling.factor = rs["factor"].number(0, 1e6);
      if (!(c.rope_scaling.factor > 0)) rs["factor"].fail("expected a number in (0, 1e6], got 0");
      if (t == "llama3") {
        // All four are required: defaults would silently change every rotary frequency.
        c.rope_scaling.low_freq_factor = rs["low_freq_factor"].number(1e-6, 1e6);
        c.rope_scaling.high_freq_factor = rs["high_freq_factor"].number(1e-6, 1e6);
        c.rope_scaling.original_max_position = rs["original_max_position_embeddings"].number(1, 1e9);
        if (!(c.rope_scaling.high_freq_factor > c.rope_scaling.low_freq_factor))
          rs["high_freq_factor"].fail("must exceed low_freq_factor");
      }
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
  // Every integer key is range-checked before narrowing (a clamp would serve a wrong model).
  auto u = [&](const std::string& k, int64_t lo, int64_t hi) { return int(f.get_int(a + "." + k, lo, hi)); };
  c.n_layers = u("block_count", 1, 1024);
  c.hidden = u("embedding_length", 1, 65536);
  c.ffn = u("feed_forward_length", 1, 1 << 20);
  c.n_heads = u("attention.head_count", 1, 1024);
  c.n_kv_heads = f.has(a + ".attention.head_count_kv") ? u("attention.head_count_kv", 1, 1024) : c.n_heads;
  c.max_position = f.has(a + ".context_length") ? u("context_length", 1, 1 << 30) : 2048;
  c.rope_theta = f.has(a + ".rope.freq_base") ? f.get_positive(a + ".rope.freq_base") : 10000.0;
  c.rms_eps = f.get_positive(a + ".attention.layer_norm_rms_epsilon");
  c.head_dim = f.has(a + ".attention.key_length") ? u("attention.key_length", 1, 1024) : c.hidden / c.n_heads;
  if (f.has(a + ".attention.value_length")) {
    const int vl = u("attention.value_length", 1, 1024);
    ATMOE_CHECK_INPUT(vl == c.head_dim, "{}: GGUF key '{}.attention.value_length' = {} differs from the key length {} "
                      "(unsupported)", f.path(), a, vl, c.head_dim);
  }
  if (f.has(a + ".rope.dimension_count")) {
    // Partial rotary embeddings (fewer rotated dimensions than head_dim) are not supported.
    const int rd = u("rope.dimension_count", 1, 1024);
    ATMOE_CHECK_INPUT(rd == c.head_dim, "{}: GGUF key '{}.rope.dimension_count' = {}: expected the head dimension {} "
                      "(partial rotary embeddings are not supported)", f.path(), a, rd, c.head_dim);
  }
  if (f.has(a + ".vocab_size")) c.vocab = u("vocab_size", 1, 1 << 22);
  else if (f.has("tokenizer.ggml.tokens")) c.vocab = int(f.get_arr("tokenizer.ggml.tokens").size());
  c.tie_embeddings = f.tensor("output.weight") == nullptr;
  c.qkv_bias = f.tensor("blk.0.attn_q.bias") != nullptr;
  c.rope_style = a == "llama" ? RopeStyle::Interleaved : RopeStyle::Neox;
  // As llama.cpp: the type defaults to linear; a factor present is applied.
  const std::string st = f.has(a + ".rope.scaling.type") ? f.get_str(a + ".rope.scaling.type") : "linear";
  ATMOE_CHECK_INPUT(st == "none" || st == "linear",
                    "{}: GGUF key '{}.rope.scaling.type' = '{}' is not supported (expected none or linear)", f.path(), a, st);
  if (f.has(a + ".rope.scaling.factor")) {
    const double factor = f.get_positive(a + ".rope.scaling.factor");
    if (st == "linear" && factor != 1.0) {
      c.rope_scaling.type = "linear";
      c.rope_scaling.factor = factor;
    }
  } else {
    ATMOE_CHECK_INPUT(!f.has(a + ".rope.scaling.type") || st == "none",
                      "{}: GGUF key '{}.rope.scaling.type' is linear but '{}.rope.scaling.factor' is missing", f.path(), a, a);
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
