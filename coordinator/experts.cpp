#include "coordinator/experts.h"

#include "common/error.h"
#include "common/log.h"
#include "kernels/cpu/matmul.h"

namespace atmoe {

SiteShapes site_shapes(const ModelConfig& c) {
  SiteShapes s;
  s.n_layers = c.n_layers;
  const int64_t d = c.hidden, q = int64_t(c.n_heads) * c.head_dim, kv = int64_t(c.n_kv_heads) * c.head_dim, f = c.ffn;
  s.d_in = {d, d, d, q, d, d, f};
  s.d_out = {q, kv, kv, d, f, f, d};
  return s;
}

ExpertPool::ExpertPool(const Bundle& b, const ModelConfig& c, DType dtype) : b_(b) {
  ATMOE_ASSERT(dtype == DType::F32 || dtype == DType::BF16);
  const SiteShapes shapes = site_shapes(c);
  for (const auto& e : b_.experts) adapters_.push_back(load_peft_adapter(e.adapter_dir, e.name, shapes));
  if (b_.general) general_ = std::make_unique<PeftAdapter>(load_peft_adapter(b_.general->adapter_dir, b_.general->name, shapes));
  router_ = std::make_unique<Router>(b_, c.n_layers, c.hidden);
  const int E = int(b_.experts.size()), G = int(b_.groups.size());
  stacks_.resize(size_t(c.n_layers) * kNumSites);
  for (int l = 0; l < c.n_layers; ++l)
    for (int si = 0; si < kNumSites; ++si) {
      SiteStack& st = stacks_[size_t(l) * kNumSites + size_t(si)];
      st.d_in = shapes.d_in[size_t(si)];
      st.d_out = shapes.d_out[size_t(si)];
      // Row plan: (expert index, LoraWeights*) per block.
      std::vector<std::pair<int, const LoraWeights*>> rows_of;
      std::vector<std::pair<int64_t, int64_t>> blocks;
      int64_t R = 0;
      auto add_block = [&](const std::vector<std::pair<int, const PeftAdapter*>>& members) {
        int64_t start = R;
        for (auto [e, ad] : members) {
          auto it = ad->modules.find({l, Site(si)});
          if (it == ad->modules.end()) continue;
          rows_of.emplace_back(e, &it->second);
          R += it->second.rank;
        }
        R = (R + cpu::kPanel - 1) / cpu::kPanel * cpu::kPanel;
        blocks.emplace_back(start, R);
      };
      for (int g = 0; g < G; ++g) {
        std::vector<std::pair<int, const PeftAdapter*>> m;
        for (int e : b_.groups[size_t(g)].experts) m.emplace_back(e, &adapters_[size_t(e)]);
        add_block(m);
      }
      if (general_) add_block({{E, general_.get()}});
      else blocks.emplace_back(R, R);
      st.R = R;
      st.block = blocks;
      st.block_experts.assign(blocks.size(), {});
      for (auto [e, w] : rows_of) {
        (void)w;
        st.block_experts[e == E ? size_t(G) : size_t(b_.experts[size_t(e)].group)].push_back(e);
      }
      st.row_expert.assign(size_t(R), -1);
      st.row_scale.assign(size_t(R), 0.f);
      if (R == 0) continue;
      // Row-major A [R, d_in] and B [d_out, R] in f32, then packed.
      std::vector<float> A(size_t(R * st.d_in), 0.f), B(size_t(st.d_out * R), 0.f);
      // Place each expert's rows at the next free row of its block.
      std::vector<int64_t> next(blocks.size());
      for (size_t k = 0; k < blocks.size(); ++k) next[k] = blocks[k].first;
      // PEFT adapters are trained on the HF layout: on a GGUF llama base, lora_B's q/k rows
      // follow the base's rope permutation.
      const bool permute = c.rope_style == RopeStyle::Interleaved && (si == int(Site::Q) || si == int(Site::K));
      auto out_row = [&](int64_t n) { return permute ? gguf_qk_row(n, c.head_dim) : n; };
      for (auto [e, w] : rows_of) {
        size_t blk = e == E ? size_t(G) : size_t(b_.experts[size_t(e)].group);
        int64_t r0 = next[blk];
        next[blk] += w->rank;
        for (int64_t r = 0; r < w->rank; ++r) {
          st.row_expert[size_t(r0 + r)] = e;
          st.row_scale[size_t(r0 + r)] = float(w->scale);
          std::memcpy(&A[size_t((r0 + r) * st.d_in)], w->A.data<float>() + r * st.d_in, size_t(st.d_in) * 4);
          for (int64_t n = 0; n < st.d_out; ++n) B[size_t(out_row(n) * R + r0 + r)] = w->B.data<float>()[n * w->rank + r];
        }
      }
      st.A = Tensor::empty(dtype, {int64_t(cpu::packed_elems(R, st.d_in))});
      st.B = Tensor::empty(dtype, {int64_t(cpu::packed_elems(st.d_out, R))});
      cpu::pack_weights(A.data(), R, st.d_in, dtype, st.A.data<void>());
      cpu::pack_weights(B.data(), st.d_out, R, dtype, st.B.data<void>());
    }
  ATMOE_LOG("coord")->info("bundle {}: {} groups, {} experts{}", b_.dir, G, E, general_ ? " + general" : "");
}

std::unique_ptr<SeqRouting> ExpertPool::new_routing(const RoutingControls& c) const {
  auto r = std::make_unique<SeqRouting>();
  r->ctl = resolve_routing(b_, c);
  return r;
}

}  // namespace atmoe
