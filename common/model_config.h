// Architecture hyper-parameters of a Llama-family decoder, from an HF config.json
// (llama, mistral, qwen2, SmolLM2) or from GGUF metadata (general.architecture llama|qwen2).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace atmoe {

class GgufFile;

enum class RopeStyle {
  Interleaved,  // pairs (2i, 2i+1): GGUF llama (convert_hf_to_gguf permutes q/k to this)
  Neox,         // pairs (i, i+d/2): HF "rotate_half", GGUF qwen2
};

struct RopeScaling {
  std::string type;  // "" (none) | "llama3" | "linear"
  double factor = 1.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
  double original_max_position = 8192;
};

struct ModelConfig {
  std::string arch;  // llama | mistral | qwen2
  int n_layers = 0, hidden = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, ffn = 0, vocab = 0;
  int max_position = 2048;
  double rope_theta = 10000.0;
  double rms_eps = 1e-5;
  bool tie_embeddings = false;
  bool qkv_bias = false;
  RopeStyle rope_style = RopeStyle::Neox;
  RopeScaling rope_scaling;

  // Checks internal consistency; `src` names the file in messages.
  void validate(const std::string& src) const;
  std::string summary() const;
};

ModelConfig config_from_hf_json(const std::string& path);  // config.json
ModelConfig config_from_gguf(const GgufFile& f);

// GGUF llama files store q and k with each head's rows reordered for the GGML rope
// (convert_hf_to_gguf: reshape(n_head, 2, D/2, K).swapaxes(1, 2)): HF output row n lands
// on GGUF row gguf_qk_row(n, D). Used to move HF-trained adapter weights onto such bases.
inline int64_t gguf_qk_row(int64_t n, int64_t head_dim) {
  const int64_t j = n % head_dim, half = head_dim / 2;
  return (n / head_dim) * head_dim + 2 * (j % half) + j / half;
}

// Per-pair inverse frequencies (head_dim/2 of them) including llama3 scaling.
std::vector<float> rope_inv_freq(const ModelConfig& c);

}  // namespace atmoe
