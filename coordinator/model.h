// The base-model runtime: weights of a Llama-family decoder and a batched forward pass
// over several sequences at once (prefill chunks and decode tokens packed into one
// [T_total, hidden] activation matrix; attention per sequence over its own KV cache).
//
// Every op runs on the model's Backend (kernels/backend.h, chosen at load: the CPU, or a
// GPU), and the weights, KV caches and activations live in its memory. Linears are
// prepared by the backend from PyTorch's [out, in] row-major in `dtype` (bf16 or f32);
// q,k,v are fused into one [(Hq + 2 Hkv) * D, hidden] matrix and gate,up into one
// [2 F, hidden] matrix so a step runs 4 GEMMs per layer. Norm weights and biases are f32.
// The embedding table stays in host memory (a step reads one row per token) and the
// logits come back to the host.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "common/model_config.h"
#include "common/tensor.h"
#include "common/tokenizer.h"
#include "kernels/backend.h"
#include "coordinator/kv_cache.h"

namespace atmoe {

class ThreadPool;
class ExpertDispatch;
struct SeqRouting;

struct Linear {
  PreparedWeight w;  // [N, K] in the model dtype, the backend's layout
  Buffer bias;       // [N] f32, or empty
  int64_t N = 0, K = 0;
};

struct LayerWeights {
  Buffer attn_norm, ffn_norm;  // [hidden] f32
  Linear qkv, o, gate_up, down;
};

struct ModelInfo {
  std::string path, format;                  // "gguf" | "hf"
  std::vector<std::string> source_dtypes;    // e.g. "Q4_1 x210"
  int64_t n_params = 0;
};

enum class LogitsMode { None, Last, All };

struct ForwardItem {
  KvCache* cache = nullptr;
  const int32_t* tokens = nullptr;
  int64_t n = 0;
  LogitsMode logits = LogitsMode::Last;
  // Expert routing of this sequence (bundles only); nullptr = base model only. For
  // per_request routing the first forward of a sequence must hold its whole prompt.
  SeqRouting* routing = nullptr;
};

class Model {
 public:
  // PATH: a .gguf file or an HF directory. dtype: BF16 or F32. check_tensors: every weight
  // is checked finite after dequantisation (one more pass over them; llama.cpp's --check-tensors).
  // be: where the model runs (not owned; outlives the model); nullptr = cpu_backend().
  static std::unique_ptr<Model> load(const std::string& path, DType dtype, bool check_tensors = false,
                                     Backend* be = nullptr);
  Model();
  ~Model();

  const ModelConfig& config() const { return cfg_; }
  const Tokenizer& tokenizer() const { return *tok_; }
  const ModelInfo& info() const { return info_; }
  Backend& backend() const { return *be_; }
  DType dtype() const { return dtype_; }
  int64_t weight_bytes() const;  // bytes of weights read by one decode step

  std::unique_ptr<KvCache> new_cache() const;
  // Attaches a bundle's experts (not owned; must outlive the model's use of it): the
  // model calls it per layer and site input (coordinator/expert_dispatch.h): route() gets
  // host rows (downloaded on a device backend), post()/wait() the backend's memory.
  void set_experts(ExpertDispatch* e) { experts_ = e; }
  ExpertDispatch* experts() const { return experts_; }
  // Mean over the tokens of the residual stream after `layer` (base model, no experts).
  std::vector<float> pooled_hidden(const int32_t* tokens, int64_t n, int layer);
  // Runs the items as one batch; appends the requested logits rows (item order, [rows, vocab])
  // to `logits` (cleared first). Advances each cache by its item's n.
  void forward(const std::vector<ForwardItem>& items, std::vector<float>& logits);

 private:
  friend struct ModelLoader;
  ModelConfig cfg_;
  std::unique_ptr<Tokenizer> tok_;
  ModelInfo info_;
  DType dtype_ = DType::BF16;
  Tensor embed_;     // [vocab, hidden] f32: the lookup reads one row per token, so exact costs nothing per step
  Buffer out_norm_;  // [hidden] f32
  Linear lm_head_;   // [vocab, hidden] model dtype (packed from embed_ when tied)
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_;
  Buffer inv_freq_dev_;  // inv_freq_ in backend memory
  Backend* be_ = nullptr;
  ExpertDispatch* experts_ = nullptr;
  int stop_after_layer_ = -1;              // pooled_hidden: stop here and
  std::vector<float>* pooled_out_ = nullptr;  // write the mean residual here
  struct Scratch;
  std::unique_ptr<Scratch> s_;
};

}  // namespace atmoe
