// An independent float64 transcription of the HF Llama forward pass (rotate_half RoPE,
// GQA, optional q/k/v biases) for the synth-models of the tests (3 layers, hidden 64,
// 4 heads, 2 KV heads, ffn 96, vocab 300), read straight from model.safetensors, with
// optional PEFT LoRA terms y += coef * (alpha / r) * B (A x) read from adapter dirs.
#pragma once
#include <functional>
#include <cstdint>
#include <string>
#include <vector>

namespace atmoe::test {

struct RefLora {
  std::string dir;  // PEFT adapter directory
  double coef;      // the routing coefficient (lambda * w_e)
};

// Per-token routing: given layer l and a token's normalised attention input u (hidden
// values, float64), the coefficients of the loras (in their order) for that token and
// layer, replacing RefLora::coef.
using RefRouter = std::function<std::vector<double>(int layer, const double* u)>;

// Logits of every position, [T, 300].
std::vector<double> reference_logits(const std::string& dir, const std::vector<int32_t>& toks,
                                     const std::vector<RefLora>& loras = {}, const RefRouter& router = {});

}  // namespace atmoe::test
