// Deterministic tiny HF-format models for fast tests: config.json (llama), model.safetensors
// (f32, N(0, 0.02) weights from mt19937_64(seed), unit norms), tokenizer.json (byte-level
// BPE: 256 byte tokens, merges learned from a fixed text, 3 special tokens) and
// tokenizer_config.json (ChatML template). Same seed and sizes give identical bytes.
#pragma once
#include <cstdint>
#include <string>

namespace atmoe {

struct SynthModelOptions {
  std::string out;
  uint64_t seed = 0;
  int layers = 2, hidden = 64, heads = 4, kv_heads = 2, ffn = 128, vocab = 512;
  int max_position = 512;
  bool tie_embeddings = true;
  std::string arch = "llama";  // llama | qwen2 (adds q/k/v biases)
};

void synth_model(const SynthModelOptions& o);

}  // namespace atmoe
