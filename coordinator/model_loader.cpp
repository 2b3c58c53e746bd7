// Loading a Model from a GGUF file or an HF directory. Every tensor's shape is checked
// against the config; a mismatch names the file, the tensor and both shapes.
#include <cblas.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/files.h"
#include "common/json_reader.h"
#include "common/tensor_check.h"
#include "common/gguf.h"
#include "common/log.h"
#include "common/safetensors.h"
#include "coordinator/model.h"
#include "kernels/backend.h"
#include "kernels/thread_pool.h"

namespace atmoe {
namespace fs = std::filesystem;

struct ModelLoader {

  static void expect_shape(const Tensor& t, std::vector<int64_t> want, const std::string& file, const std::string& name) {
    ATMOE_CHECK_INPUT(t.shape() == want, "{}: tensor '{}' has shape {}, expected {}", file, name, t.shape_str(),
                      shape_to_string(want));
  }

  // f32 [N, K] -> a Linear prepared by the model's backend (its own layout) in dt.
  static Linear pack(Model& m, const Tensor& f32, DType dt) {
    Linear L;
    L.N = f32.dim(0);
    L.K = f32.dim(1);
    L.w = prepare_weight(*m.be_, f32.data<float>(), L.N, L.K, dt);
    return L;
  }
  // An f32 vector (norm weights, biases) copied into backend memory.
  static Buffer vec(Model& m, const Tensor& f32) {
    Buffer b(*m.be_, f32.nbytes());
    m.be_->upload(b.get(), f32.data<float>(), f32.nbytes());
    return b;
  }

  // Concatenates f32 matrices along rows (fused q|k|v and gate|up).
  static Tensor concat_rows(const std::vector<Tensor>& parts) {
    int64_t rows = 0, cols = parts[0].dim(1);
    for (auto& p : parts) rows += p.dim(0);
    Tensor f = Tensor::empty(DType::F32, {rows, cols});
    float* o = f.data<float>();
    for (auto& p : parts) {
      std::memcpy(o, p.data<float>(), p.nbytes());
      o += p.numel();
    }
    return f;
  }
  static Tensor concat_vec(const std::vector<Tensor>& parts) {
    int64_t n = 0;
    for (auto& p : parts) n += p.numel();
    Tensor f = Tensor::empty(DType::F32, {n});
    float* o = f.data<float>();
    for (auto& p : parts) {
      std::memcpy(o, p.data<float>(), p.nbytes());
      o += p.numel();
    }
    return f;
  }

  static void finish(Model& m) {
    const auto& c = m.cfg_;
    m.inv_freq_ = rope_inv_freq(c);
    if (c.tie_embeddings) {
      m.lm_head_ = pack(m, m.embed_, m.dtype_);
    }
    m.inv_freq_dev_ = Buffer(*m.be_, m.inv_freq_.size() * 4);
    m.be_->upload(m.inv_freq_dev_.get(), m.inv_freq_.data(), m.inv_freq_.size() * 4);
    openblas_set_num_threads(ThreadPool::global().size());
    ATMOE_CHECK_INPUT(m.tok_->vocab_size() <= c.vocab, "{}: tokenizer has {} tokens but the model's vocabulary is {}",
                      m.info_.path, m.tok_->vocab_size(), c.vocab);
  }

  static void load_gguf(Model& m, const std::string& path, DType dt, bool check) {
    GgufFile f(path);
    m.cfg_ = config_from_gguf(f);
    const auto& c = m.cfg_;
    m.tok_ = std::make_unique<Tokenizer>(Tokenizer::from_gguf(f));
    std::map<std::string, int> counts;
    for (const auto& t : f.tensors()) counts[ggml_type_name(t.type)]++;
    for (auto& [k, v] : counts) m.info_.source_dtypes.push_back(fmt::format("{} x{}", k, v));
    std::set<std::string> used;
    auto get = [&](const std::string& name, std::vector<int64_t> want) {
      ATMOE_CHECK_INPUT(f.tensor(name), "{}: tensor '{}' not found", path, name);
      used.insert(name);
      Tensor t = f.load_f32(name);
      expect_shape(t, want, path, name);
      if (check) check_finite(t, path, name);
      m.info_.n_params += t.numel();
      return t;
    };
    const int64_t d = c.hidden, D = c.head_dim, q = int64_t(c.n_heads) * D, kv = int64_t(c.n_kv_heads) * D;
    m.embed_ = get("token_embd.weight", {c.vocab, d});
    m.out_norm_ = vec(m, get("output_norm.weight", {d}));
    if (!c.tie_embeddings) {
      m.lm_head_ = pack(m, get("output.weight", {c.vocab, d}), dt);
    }
    for (int l = 0; l < c.n_layers; ++l) {
      std::string p = "blk." + std::to_string(l) + ".";
      LayerWeights L;
      L.attn_norm = vec(m, get(p + "attn_norm.weight", {d}));
      L.ffn_norm = vec(m, get(p + "ffn_norm.weight", {d}));
      L.qkv = pack(m, concat_rows({get(p + "attn_q.weight", {q, d}), get(p + "attn_k.weight", {kv, d}),
                             get(p + "attn_v.weight", {kv, d})}), dt);
      if (c.qkv_bias)
        L.qkv.bias = vec(m, concat_vec({get(p + "attn_q.bias", {q}), get(p + "attn_k.bias", {kv}), get(p + "attn_v.bias", {kv})}));
      L.o = pack(m, get(p + "attn_output.weight", {d, q}), dt);
      L.gate_up = pack(m, concat_rows({get(p + "ffn_gate.weight", {c.ffn, d}), get(p + "ffn_up.weight", {c.ffn, d})}), dt);
      L.down = pack(m, get(p + "ffn_down.weight", {d, c.ffn}), dt);
      m.layers_.push_back(std::move(L));
    }
    m.info_.format = "gguf";
    finish(m);
    // llama3-style rope scaling arrives as per-pair frequency divisors.
    if (f.tensor("rope_freqs.weight")) {
      Tensor rf = get("rope_freqs.weight", {int64_t(c.head_dim / 2)});
      for (int i = 0; i < c.head_dim / 2; ++i) {
        const float v = rf.data<float>()[i];
        ATMOE_CHECK_INPUT(std::isfinite(v) && v > 0, "{}: tensor 'rope_freqs.weight'[{}] = {}: expected a finite number > 0",
                          path, i, v);
        m.inv_freq_[size_t(i)] /= v;
      }
    }
    // A tensor the model does not use (a bias, an extra layer, another architecture's
    // weight) means the file is not what the config says: refuse rather than ignore it.
    for (const auto& t : f.tensors())
      ATMOE_CHECK_INPUT(used.count(t.name), "{}: tensor '{}' is not used by a {} model of {} layers{} (unsupported or "
                        "inconsistent with the metadata)", path, t.name, c.arch, c.n_layers,
                        c.qkv_bias ? " with q/k/v biases" : "");
  }

  static void load_hf(Model& m, const std::string& dir, DType dt, bool check) {
    std::string cfg_path = (fs::path(dir) / "config.json").string();
    ATMOE_CHECK_INPUT(path_exists(cfg_path, "model config"), "{}: missing config.json", dir);
    m.cfg_ = config_from_hf_json(cfg_path);
    const auto& c = m.cfg_;
    m.tok_ = std::make_unique<Tokenizer>(Tokenizer::from_hf_dir(dir));
    // Shards: model.safetensors, or the files named by model.safetensors.index.json.
    std::vector<std::unique_ptr<SafetensorsFile>> files;
    std::map<std::string, SafetensorsFile*> where;
    std::string single = (fs::path(dir) / "model.safetensors").string();
    std::string index = (fs::path(dir) / "model.safetensors.index.json").string();
    std::vector<std::string> shard_names;
    std::map<std::string, std::string> index_map, shard_of;  // tensor -> shard: from the index, and found
    if (path_exists(single, "model weights")) {
      shard_names.push_back("model.safetensors");
    } else {
      ATMOE_CHECK_INPUT(path_exists(index, "model index"), "{}: no model.safetensors or model.safetensors.index.json", dir);
      const nlohmann::json j = read_json_file(index, "model index", size_t(64) << 20);
      const JsonAt wm = JsonAt(j, index)["weight_map"];
      std::set<std::string> s;
      for (auto it = wm.object().begin(); it != wm.object().end(); ++it) {
        const std::string sn = wm[it.key()].str();
        s.insert(sn);
        index_map[it.key()] = sn;
      }
      shard_names.assign(s.begin(), s.end());
    }
    for (const auto& sn : shard_names) {
      ATMOE_CHECK_INPUT(sn.find('/') == std::string::npos && sn.find("..") == std::string::npos,
                        "{}: shard name '{}' must be a file in the model directory", index, sn);
      files.push_back(std::make_unique<SafetensorsFile>((fs::path(dir) / sn).string()));
      for (const auto& n : files.back()->names()) {
        auto [it, fresh] = where.emplace(n, files.back().get());
        ATMOE_CHECK_INPUT(fresh, "{}: tensor '{}' is in two shards, {} and {}", index, n, it->second->path(), sn);
        shard_of[n] = sn;
      }
    }
    // The index and the shards agree: each listed tensor is in the shard it names, and
    // every tensor of a shard is listed.
    for (const auto& [n, sn] : index_map)
      ATMOE_CHECK_INPUT(shard_of.count(n) && shard_of[n] == sn, "{}: weight_map.{}: shard {} has no such tensor{}", index,
                        n, sn, shard_of.count(n) ? " (it is in " + shard_of[n] + ")" : std::string());
    if (!index_map.empty())
      for (const auto& [n, sn] : shard_of)
        ATMOE_CHECK_INPUT(index_map.count(n), "{}: weight_map: tensor '{}' of shard {} is not listed", index, n, sn);
    std::map<std::string, int> counts;
    for (auto& [n, sf] : where) counts[dtype_name(sf->entry(n).dtype)]++;
    for (auto& [k, v] : counts) m.info_.source_dtypes.push_back(fmt::format("{} x{}", k, v));
    std::set<std::string> used;
    auto get = [&](const std::string& name, std::vector<int64_t> want) {
      auto it = where.find(name);
      ATMOE_CHECK_INPUT(it != where.end(), "{}: tensor '{}' not found", dir, name);
      used.insert(name);
      Tensor t = it->second->get(name);
      ATMOE_CHECK_INPUT(t.dtype() == DType::F32 || t.dtype() == DType::F16 || t.dtype() == DType::BF16,
                        "{}: tensor '{}' has dtype {}, expected F32, F16 or BF16", it->second->path(), name, dtype_name(t.dtype()));
      expect_shape(t, want, it->second->path(), name);
      if (check) check_finite(t, it->second->path(), name);
      m.info_.n_params += t.numel();
      return t.to(DType::F32);
    };
    const int64_t d = c.hidden, D = c.head_dim, q = int64_t(c.n_heads) * D, kv = int64_t(c.n_kv_heads) * D;
    m.embed_ = get("model.embed_tokens.weight", {c.vocab, d});
    m.out_norm_ = vec(m, get("model.norm.weight", {d}));
    if (!c.tie_embeddings || where.count("lm_head.weight")) {
      m.cfg_.tie_embeddings = false;
      m.lm_head_ = pack(m, get("lm_head.weight", {c.vocab, d}), dt);
    }
    for (int l = 0; l < c.n_layers; ++l) {
      std::string p = "model.layers." + std::to_string(l) + ".";
      LayerWeights L;
      L.attn_norm = vec(m, get(p + "input_layernorm.weight", {d}));
      L.ffn_norm = vec(m, get(p + "post_attention_layernorm.weight", {d}));
      L.qkv = pack(m, concat_rows({get(p + "self_attn.q_proj.weight", {q, d}), get(p + "self_attn.k_proj.weight", {kv, d}),
                             get(p + "self_attn.v_proj.weight", {kv, d})}), dt);
      if (c.qkv_bias)
        L.qkv.bias = vec(m, concat_vec({get(p + "self_attn.q_proj.bias", {q}), get(p + "self_attn.k_proj.bias", {kv}),
                                 get(p + "self_attn.v_proj.bias", {kv})}));
      L.o = pack(m, get(p + "self_attn.o_proj.weight", {d, q}), dt);
      L.gate_up = pack(m, concat_rows({get(p + "mlp.gate_proj.weight", {c.ffn, d}), get(p + "mlp.up_proj.weight", {c.ffn, d})}), dt);
      L.down = pack(m, get(p + "mlp.down_proj.weight", {d, c.ffn}), dt);
      m.layers_.push_back(std::move(L));
    }
    m.info_.format = "hf";
    finish(m);
    // A tensor the model does not use (a bias, an extra layer, another architecture's
    // weight) means the checkpoint is not what config.json says: refuse rather than ignore
    // it. Rotary inverse-frequency buffers (recomputed from the config) are the exception.
    for (const auto& [n, sf] : where) {
      if (used.count(n)) continue;
      static const std::string kInvFreq = "rotary_emb.inv_freq";
      const bool inv_freq = n.size() >= kInvFreq.size() && n.compare(n.size() - kInvFreq.size(), kInvFreq.size(), kInvFreq) == 0;
      ATMOE_CHECK_INPUT(inv_freq, "{}: tensor '{}' is not used by a {} model of {} layers{} (unsupported, or "
                        "inconsistent with config.json)", sf->path(), n, c.arch, c.n_layers,
                        c.qkv_bias ? " with q/k/v biases" : " without q/k/v biases");
    }
  }
};

std::unique_ptr<Model> Model::load(const std::string& path, DType dtype, bool check_tensors, Backend* be) {
  ATMOE_CHECK_INPUT(dtype == DType::BF16 || dtype == DType::F32, "--dtype {}: expected bf16 or f32", dtype_name(dtype));
  auto m = std::make_unique<Model>();
  m->be_ = be ? be : &cpu_backend();
  m->dtype_ = dtype;
  m->info_.path = path;
  const auto t0 = std::chrono::steady_clock::now();
  switch (path_kind(path, "model")) {
    case PathKind::Missing: ATMOE_INPUT_ERROR("{}: no such file or directory", path);
    case PathKind::Directory: ModelLoader::load_hf(*m, path, dtype, check_tensors); break;
    case PathKind::Regular: ModelLoader::load_gguf(*m, path, dtype, check_tensors); break;
    case PathKind::Other: require_regular_file(path, "model");
  }
  if (check_tensors)
    ATMOE_LOG("model")->info("checked {} weights finite; load took {:.2f} s", m->info_.n_params,
                             std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  ATMOE_LOG("model")->info("loaded {} ({}): {}", path, m->info_.format, m->cfg_.summary());
  return m;
}

}  // namespace atmoe
