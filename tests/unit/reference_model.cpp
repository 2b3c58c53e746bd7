#include "tests/unit/reference_model.h"

#include <cmath>
#include <fstream>
#include <memory>

#include "common/error.h"

#include <nlohmann/json.hpp>

#include "common/safetensors.h"

namespace atmoe::test {

// Float64 reference: HF LlamaForCausalLM semantics (rotate_half RoPE), all positions.
std::vector<double> reference_logits(const std::string& dir, const std::vector<int32_t>& toks,
                                     const std::vector<RefLora>& loras, const RefRouter& router) {
  SafetensorsFile f(dir + "/model.safetensors");
  auto W = [&](const std::string& n) {
    Tensor t = f.get(n).to(DType::F32);
    return std::vector<double>(t.data<float>(), t.data<float>() + t.numel());
  };
  auto add_bias = [&](std::vector<double>& y, const std::string& n, int N) {
    if (!f.has(n)) return;
    auto b = W(n);
    for (size_t i = 0; i < y.size(); ++i) y[i] += b[i % size_t(N)];
  };
  const int L = 3, d = 64, H = 4, Hkv = 2, D = 16, F = 96, V = 300, T = int(toks.size());
  const double eps = 1e-5, theta = 10000;
  auto emb = W("model.embed_tokens.weight");
  std::vector<double> x(static_cast<size_t>(T * d));
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < d; ++i) x[size_t(t * d + i)] = emb[size_t(toks[size_t(t)] * d + i)];
  auto rms = [&](const std::vector<double>& in, const std::vector<double>& w) {
    std::vector<double> o(in.size());
    for (int t = 0; t < T; ++t) {
      double ss = 0;
      for (int i = 0; i < d; ++i) ss += in[size_t(t * d + i)] * in[size_t(t * d + i)];
      double s = 1 / std::sqrt(ss / d + eps);
      for (int i = 0; i < d; ++i) o[size_t(t * d + i)] = in[size_t(t * d + i)] * s * w[size_t(i)];
    }
    return o;
  };
  auto lin = [&](const std::vector<double>& in, int K, const std::vector<double>& w, int N) {
    std::vector<double> o(static_cast<size_t>(T * N));
    for (int t = 0; t < T; ++t)
      for (int n = 0; n < N; ++n) {
        double a = 0;
        for (int k = 0; k < K; ++k) a += in[size_t(t * K + k)] * w[size_t(n * K + k)];
        o[size_t(t * N + n)] = a;
      }
    return o;
  };
  auto rope = [&](std::vector<double>& v, int heads) {
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < D / 2; ++i) {
          double a = t * std::pow(theta, -2.0 * i / D);
          double& x0 = v[size_t((t * heads + h) * D + i)];
          double& x1 = v[size_t((t * heads + h) * D + i + D / 2)];
          double r0 = x0 * std::cos(a) - x1 * std::sin(a), r1 = x1 * std::cos(a) + x0 * std::sin(a);
          x0 = r0;
          x1 = r1;
        }
  };
  // LoRA terms: y += coef * (alpha / r) * B (A x) for each adapter targeting the module.
  struct Loaded {
    std::unique_ptr<SafetensorsFile> f;
    double scale, coef;
  };
  std::vector<Loaded> ad;
  for (const auto& lr : loras) {
    std::ifstream cf(lr.dir + "/adapter_config.json");
    auto cj = nlohmann::json::parse(cf);
    double r = cj["r"].get<double>(), alpha = cj["lora_alpha"].get<double>();
    ad.push_back({std::make_unique<SafetensorsFile>(lr.dir + "/adapter_model.safetensors"), alpha / r, lr.coef});
  }
  std::vector<std::vector<double>> coef(static_cast<size_t>(T));  // [T][adapter], per layer
  for (auto& c : coef)
    for (const auto& a : ad) c.push_back(a.coef);
  auto lora = [&](std::vector<double>& y, const std::vector<double>& in, int K, int N, const std::string& mod) {
    for (auto& a : ad) {
      std::string k = "base_model.model." + mod + ".lora_";
      if (!a.f->has(k + "A.weight")) continue;
      Tensor A = a.f->get(k + "A.weight").to(DType::F32), B = a.f->get(k + "B.weight").to(DType::F32);
      int64_t r = A.dim(0);
      for (int t = 0; t < T; ++t) {
        std::vector<double> u(static_cast<size_t>(r), 0.0);
        for (int64_t i = 0; i < r; ++i)
          for (int k2 = 0; k2 < K; ++k2) u[size_t(i)] += double(A.data<float>()[i * K + k2]) * in[size_t(t * K + k2)];
        for (int n = 0; n < N; ++n) {
          double s = 0;
          for (int64_t i = 0; i < r; ++i) s += double(B.data<float>()[n * r + i]) * u[size_t(i)];
          y[size_t(t * N + n)] += coef[size_t(t)][size_t(&a - ad.data())] * a.scale * s;
        }
      }
    }
  };
  for (int l = 0; l < L; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    auto h = rms(x, W(p + "input_layernorm.weight"));
    if (router)
      for (int t = 0; t < T; ++t) {
        coef[size_t(t)] = router(l, &h[size_t(t * d)]);
        ATMOE_ASSERT(coef[size_t(t)].size() == ad.size());
      }
    auto q = lin(h, d, W(p + "self_attn.q_proj.weight"), H * D);
    auto k = lin(h, d, W(p + "self_attn.k_proj.weight"), Hkv * D);
    auto v = lin(h, d, W(p + "self_attn.v_proj.weight"), Hkv * D);
    add_bias(q, p + "self_attn.q_proj.bias", H * D);
    add_bias(k, p + "self_attn.k_proj.bias", Hkv * D);
    add_bias(v, p + "self_attn.v_proj.bias", Hkv * D);
    lora(q, h, d, H * D, p + "self_attn.q_proj");
    lora(k, h, d, Hkv * D, p + "self_attn.k_proj");
    lora(v, h, d, Hkv * D, p + "self_attn.v_proj");
    rope(q, H);
    rope(k, Hkv);
    std::vector<double> att(static_cast<size_t>(T * H * D));
    for (int t = 0; t < T; ++t)
      for (int hh = 0; hh < H; ++hh) {
        int kh = hh / (H / Hkv);
        std::vector<double> s(static_cast<size_t>(t + 1));
        double m = -1e300, z = 0;
        for (int j = 0; j <= t; ++j) {
          double a = 0;
          for (int i = 0; i < D; ++i) a += q[size_t((t * H + hh) * D + i)] * k[size_t((j * Hkv + kh) * D + i)];
          s[size_t(j)] = a / std::sqrt(double(D));
          m = std::max(m, s[size_t(j)]);
        }
        for (auto& e : s) z += (e = std::exp(e - m));
        for (int i = 0; i < D; ++i) {
          double o = 0;
          for (int j = 0; j <= t; ++j) o += s[size_t(j)] / z * v[size_t((j * Hkv + kh) * D + i)];
          att[size_t((t * H + hh) * D + i)] = o;
        }
      }
    auto o = lin(att, H * D, W(p + "self_attn.o_proj.weight"), d);
    lora(o, att, H * D, d, p + "self_attn.o_proj");
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = rms(x, W(p + "post_attention_layernorm.weight"));
    auto g = lin(h, d, W(p + "mlp.gate_proj.weight"), F);
    auto u = lin(h, d, W(p + "mlp.up_proj.weight"), F);
    lora(g, h, d, F, p + "mlp.gate_proj");
    lora(u, h, d, F, p + "mlp.up_proj");
    for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
    auto dn = lin(g, F, W(p + "mlp.down_proj.weight"), d);
    lora(dn, g, F, d, p + "mlp.down_proj");
    for (size_t i = 0; i < x.size(); ++i) x[i] += dn[i];
  }
  auto xf = rms(x, W("model.norm.weight"));
  return lin(xf, d, emb, V);
}

}  // namespace atmoe::test
