#include "worker/expert_shard.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

#include "common/error.h"
#include "common/log.h"
#include "common/model_config.h"
#include "common/prefetch.h"

namespace atmoe {

SiteShapes site_shapes(const ModelConfig& c) {
  SiteShapes s;
  s.n_layers = c.n_layers;
  const int64_t d = c.hidden, q = int64_t(c.n_heads) * c.head_dim, kv = int64_t(c.n_kv_heads) * c.head_dim, f = c.ffn;
  s.d_in = {d, d, d, q, d, d, f};
  s.d_out = {q, kv, kv, d, f, f, d};
  return s;
}

ShardSpec shard_spec(const ModelConfig& c, DType dtype, std::vector<int> groups, bool general) {
  ShardSpec s;
  s.shapes = site_shapes(c);
  s.head_dim = c.head_dim;
  s.permute_qk = c.rope_style == RopeStyle::Interleaved;
  s.dtype = dtype;
  s.groups = std::move(groups);
  s.general = general;
  return s;
}

namespace {

// Rows of one (layer, site) while loading: A row-major [R, d_in] and B transposed,
// row-major [R, d_out], in the model dtype (W = float or uint16_t bf16 bits).
template <class W>
struct Stage {
  std::vector<W> A, Bt;
  std::vector<int32_t> row_col;
  std::vector<float> row_scale;
  std::vector<std::pair<int64_t, int64_t>> block;
  int64_t rows() const { return int64_t(row_col.size()); }
};

template <class W>
W to_w(float v) {
  if constexpr (sizeof(W) == 4)
    return v;
  else
    return f32_to_bf16(v);
}

// The banks' place in the arena: per block (expert group), per layer, per site input, the
// A_b of its sites then their B_b, each piece 64-byte aligned: the order a decode step reads
// them in (shrink of every site, then expand). A step whose tokens use one group reads one
// run of memory per site input, and the next input's run follows it; short scattered runs
// cost several times their bytes in DRAM latency (docs/performance.md).
constexpr size_t kPieceAlign = 64;

size_t piece(size_t bytes) {
  return (bytes + kPieceAlign - 1) / kPieceAlign * kPieceAlign;
}

// Staged rows -> the arena: A_b uploaded as is (row-major), B_b ([d_out, rows] = the
// block's Btᵀ) prepared by the backend.
template <class W>
void pack_block(Backend& be, const Stage<W>& sg, int64_t r0, int64_t r1, int64_t din, int64_t dout, DType dt,
                uint8_t* a_dst, uint8_t* b_dst, std::vector<float>& tmp) {
  const int64_t rows = r1 - r0;
  be.upload(a_dst, sg.A.data() + r0 * din, size_t(rows * din) * sizeof(W));
  tmp.resize(size_t(dout * rows));
  for (int64_t r = 0; r < rows; ++r) {
    const W* b = sg.Bt.data() + (r0 + r) * dout;
    for (int64_t n = 0; n < dout; ++n) {
      if constexpr (sizeof(W) == 4)
        tmp[size_t(n * rows + r)] = b[n];
      else
        tmp[size_t(n * rows + r)] = bf16_to_f32(b[n]);
    }
  }
  be.prepare_lora_b(tmp.data(), dout, rows, dt, b_dst);
}

template <class W>
void load_stacks(Backend& be, const Bundle& bundle, const ShardSpec& spec, const std::vector<std::vector<int>>& blocks,
                 std::vector<ShardStack>& stacks, Buffer& arena, std::vector<StackBlock>& table, Buffer& rows) {
  const int L = spec.shapes.n_layers;
  const int E = int(bundle.experts.size());
  std::vector<Stage<W>> stage(size_t(L) * kNumSites);
  int col = 0;
  for (const auto& blk : blocks) {
    for (auto& sg : stage) sg.block.emplace_back(sg.rows(), sg.rows());
    for (int e : blk) {
      const BundleExpert& be = e == E ? *bundle.general : bundle.experts[size_t(e)];
      PeftAdapter ad = load_peft_adapter(be.adapter_dir, be.name, spec.shapes);
      for (auto& [key, w] : ad.modules) {
        const auto [l, s] = key;
        const int si = int(s);
        Stage<W>& sg = stage[size_t(l) * kNumSites + size_t(si)];
        const int64_t din = spec.shapes.d_in[size_t(si)], dout = spec.shapes.d_out[size_t(si)];
        const bool permute = spec.permute_qk && (s == Site::Q || s == Site::K);
        const float* A = w.A.template data<float>();
        const float* B = w.B.template data<float>();
        for (int64_t r = 0; r < w.rank; ++r) {
          for (int64_t k = 0; k < din; ++k) sg.A.push_back(to_w<W>(A[r * din + k]));
          const size_t at = sg.Bt.size();
          sg.Bt.resize(at + size_t(dout));
          for (int64_t n = 0; n < dout; ++n)
            sg.Bt[at + size_t(permute ? gguf_qk_row(n, spec.head_dim) : n)] = to_w<W>(B[n * w.rank + r]);
          sg.row_col.push_back(col);
          sg.row_scale.push_back(float(w.scale));
        }
        sg.block.back().second = sg.rows();
      }
      ++col;
    }
  }
  // The arena's layout (block, layer, site), then one allocation.
  const size_t nb = blocks.size();
  std::vector<size_t> a_off(stage.size() * nb), b_off(stage.size() * nb);
  size_t total = 0;
  for (size_t b = 0; b < nb; ++b)
    for (int l = 0; l < L; ++l)
      for (int in = 0; in < kNumSiteInputs; ++in)
        for (int pass = 0; pass < 2; ++pass)  // the input's A_b pieces, then its B_b pieces
          for (int j = 0; j < input_site_count(SiteInput(in)); ++j) {
            const int si = int(input_first_site(SiteInput(in))) + j;
            const size_t i = size_t(l) * kNumSites + size_t(si);
            const auto [r0, r1] = stage[i].block[b];
            if (r0 == r1) continue;
            const int64_t din = spec.shapes.d_in[size_t(si)], dout = spec.shapes.d_out[size_t(si)];
            if (pass == 0) {
              a_off[i * nb + b] = total;
              total += piece(size_t((r1 - r0) * din) * sizeof(W));
            } else {
              b_off[i * nb + b] = total;
              total += piece(be.lora_b_bytes(dout, r1 - r0, spec.dtype));
            }
          }
  if (total > 0) arena = Buffer(be, total);
  uint8_t* base = static_cast<uint8_t*>(arena.get());
  // The row tables: per stack row_col then row_scale, each run 64-byte aligned.
  std::vector<size_t> rows_off(stage.size());
  size_t rows_total = 0;
  for (size_t i = 0; i < stage.size(); ++i) {
    rows_off[i] = rows_total;
    rows_total += 2 * piece(stage[i].row_col.size() * 4);
  }
  if (rows_total > 0) rows = Buffer(be, rows_total);
  uint8_t* rbase = static_cast<uint8_t*>(rows.get());
  table.assign(stage.size() * nb, StackBlock());
  std::vector<float> tmp;
  for (int l = 0; l < L; ++l)
    for (int si = 0; si < kNumSites; ++si) {
      const size_t i = size_t(l) * kNumSites + size_t(si);
      Stage<W>& sg = stage[i];
      ShardStack& st = stacks[i];
      st.d_in = spec.shapes.d_in[size_t(si)];
      st.d_out = spec.shapes.d_out[size_t(si)];
      st.R = sg.rows();
      StackBlock* tb = table.data() + i * nb;
      st.block = tb;
      for (size_t b = 0; b < nb; ++b) {
        const auto [r0, r1] = sg.block[b];
        tb[b].r0 = r0;
        tb[b].r1 = r1;
        if (r0 == r1) continue;
        tb[b].A = base + a_off[i * nb + b];
        tb[b].B = base + b_off[i * nb + b];
        pack_block(be, sg, r0, r1, st.d_in, st.d_out, spec.dtype, base + a_off[i * nb + b], base + b_off[i * nb + b],
                   tmp);
      }
      if (st.R > 0) {
        const size_t n = sg.row_col.size() * 4;
        uint8_t* rc = rbase + rows_off[i];
        be.upload(rc, sg.row_col.data(), n);
        be.upload(rc + piece(n), sg.row_scale.data(), n);
        st.row_col = reinterpret_cast<const int32_t*>(rc);
        st.row_scale = reinterpret_cast<const float*>(rc + piece(n));
      }
      sg = Stage<W>();  // the staged copy goes as soon as it is packed
    }
}

}  // namespace

ExpertShard::ExpertShard(const Bundle& b, const ShardSpec& spec)
    : spec_(spec),
      own_be_(spec.backend ? nullptr : make_backend("cpu")),
      be_(spec.backend ? spec.backend : own_be_.get()) {
  ATMOE_ASSERT(spec.dtype == DType::F32 || spec.dtype == DType::BF16);
  const int E = int(b.experts.size());
  std::vector<std::vector<int>> blocks;
  for (int g : spec.groups) {
    ATMOE_ASSERT(g >= 0 && g < int(b.groups.size()));
    blocks.push_back(b.groups[size_t(g)].experts);
  }
  if (spec.general) {
    ATMOE_ASSERT(b.general.has_value());
    blocks.push_back({E});
  }
  for (const auto& blk : blocks) {
    const int c0 = int(column_expert_.size());
    column_expert_.insert(column_expert_.end(), blk.begin(), blk.end());
    block_cols_.emplace_back(c0, int(column_expert_.size()));
  }
  stacks_.resize(size_t(spec.shapes.n_layers) * kNumSites);
  if (spec.dtype == DType::F32)
    load_stacks<float>(*be_, b, spec, blocks, stacks_, arena_, blocks_, rows_);
  else
    load_stacks<uint16_t>(*be_, b, spec, blocks, stacks_, arena_, blocks_, rows_);
  bytes_ = int64_t(arena_.bytes() + rows_.bytes());
  ATMOE_LOG("worker")->info("expert shard: {} groups{}, {} experts, {:.1f} MiB", spec.groups.size(),
                            spec.general ? " + general" : "", column_expert_.size(), double(bytes_) / (1 << 20));
}

bool ExpertShard::has_input(int layer, SiteInput in) const {
  for (int i = 0; i < input_site_count(in); ++i)
    if (stack(layer, Site(int(input_first_site(in)) + i)).R > 0) return true;
  return false;
}

int64_t ExpertShard::d_in(SiteInput in) const {
  return spec_.shapes.d_in[size_t(input_first_site(in))];
}

int64_t ExpertShard::out_cols(SiteInput in) const {
  int64_t n = 0;
  for (int i = 0; i < input_site_count(in); ++i) n += spec_.shapes.d_out[size_t(int(input_first_site(in)) + i)];
  return n;
}

int64_t ExpertShard::mark_uses(const float* coef, int64_t ldc, int64_t T) const {
  const size_t nb = block_cols_.size();
  s_.uses.assign(size_t(T) * nb, 0);
  int64_t used_rows = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float* ct = coef + t * ldc;
    bool any = false;
    for (size_t b = 0; b < nb; ++b)
      for (int c = block_cols_[b].first; c < block_cols_[b].second; ++c)
        if (ct[c] != 0.f) {
          s_.uses[size_t(t) * nb + b] = 1;
          any = true;
          break;
        }
    used_rows += any;
  }
  return used_rows;
}

void ExpertShard::prefetch_input(int layer, SiteInput in) const {
  const size_t i0 = size_t(layer) * kNumSites + size_t(input_first_site(in)), n = size_t(input_site_count(in));
  const size_t nb = block_cols_.size();
  prefetch_lines(&stacks_[i0], n * sizeof(ShardStack));
  // Many groups: the first 4 kB (the hardware prefetcher follows the rest as build() reads it).
  prefetch_lines(blocks_.data() + i0 * nb, std::min<size_t>(n * nb * sizeof(StackBlock), 4096));
  if (!be_->host_memory()) return;
  for (size_t i = i0; i < i0 + n; ++i) {
    const ShardStack& st = stacks_[i];
    prefetch_lines(st.row_col, std::min<size_t>(size_t(st.R) * 4, 2048));
    prefetch_lines(st.row_scale, std::min<size_t>(size_t(st.R) * 4, 2048));
  }
}

int64_t ExpertShard::build(int layer, SiteInput in, const float* x, int64_t ldx, const float* coef, int64_t ldc,
                           float* y, int64_t ldy, int64_t T, ops::LoraMixParams& p) const {
  const size_t nb = block_cols_.size();
  if (T <= 0 || nb == 0) return 0;
  prefetch_input(layer, in);  // first: has_input() reads the stacks, cold
  if (!has_input(layer, in)) return 0;
  const int64_t used_rows = mark_uses(coef, ldc, T);
  if (used_rows == 0) return 0;
  // The tokens that use each block (the same for every site of the input).
  s_.toks.resize(nb);
  for (size_t b = 0; b < nb; ++b) {
    s_.toks[b].clear();
    for (int64_t t = 0; t < T; ++t)
      if (s_.uses[size_t(t) * nb + b]) s_.toks[b].push_back(int32_t(t));
  }
  int n = 0;
  int64_t col = 0;
  for (int i = 0; i < input_site_count(in); ++i) {
    const ShardStack& st = stack(layer, Site(int(input_first_site(in)) + i));
    if (st.R > 0) {
      auto& blks = s_.blocks[i];
      blks.resize(nb);
      for (size_t b = 0; b < nb; ++b) {
        blks[b].r0 = st.block[b].r0;
        blks[b].r1 = st.block[b].r1;
        blks[b].A = st.block[b].A;
        blks[b].B = st.block[b].B;
        const bool rows = blks[b].r0 < blks[b].r1;
        blks[b].toks = rows ? s_.toks[b].data() : nullptr;
        blks[b].n_toks = rows ? int64_t(s_.toks[b].size()) : 0;
      }
      s_.site_col[n] = col;
      ops::LoraSite& s = s_.sites[n++];
      s.R = st.R;
      s.d_out = st.d_out;
      s.row_col = st.row_col;
      s.row_scale = st.row_scale;
      s.blocks = blks.data();
      s.n_blocks = int64_t(nb);
      s.y = y ? y + col : nullptr;  // post(): pointed at y or the deltas once it knows which
      s.ldy = ldy;
    }
    col += st.d_out;
  }
  p = ops::LoraMixParams();
  p.x = x;
  p.ldx = ldx;
  p.T = T;
  p.d_in = d_in(in);
  p.dtype = spec_.dtype;
  p.coef = coef;
  p.ldc = ldc;
  p.sites = s_.sites;
  p.n_sites = n;
  return used_rows;
}

void ExpertShard::apply(int layer, SiteInput in, const float* x, int64_t ldx, const float* coef, int64_t ldc, float* y,
                        int64_t ldy, int64_t T) const {
  abandon();  // the scratch below is the pending post()'s
  ops::LoraMixParams p;
  const int64_t used_rows = build(layer, in, x, ldx, coef, ldc, y, ldy, T, p);
  if (used_rows == 0) return;
  if (!be_->host_memory()) {
    s_.coef.reserve(*be_, size_t(T * ldc) * 4);
    be_->upload(s_.coef.get(), coef, size_t(T * ldc) * 4);
    p.coef = s_.coef.as<float>();
  }
  s_.ws.reserve(*be_, be_->workspace_bytes(p));
  be_->lora_mix(p, s_.ws.get());
  counters_.applies += 1;
  counters_.token_rows += used_rows;
}

bool ExpertShard::post(int layer, SiteInput in, const float* x, int64_t ldx, const float* coef, int64_t ldc,
                       int64_t T) const {
  abandon();                              // a post() whose finish() never came (an exception in between)
  if (!be_->host_memory()) return false;  // coef is uploaded in apply(); the deltas are host rows
  const int64_t used_rows = build(layer, in, x, ldx, coef, ldc, nullptr, 0, T, s_.post);
  if (used_rows == 0) return true;  // nothing to add
  s_.ws.reserve(*be_, be_->workspace_bytes(s_.post));
  counters_.applies += 1;
  counters_.token_rows += used_rows;
  const int n_sites = int(s_.post.n_sites);
  if (be_->lora_mix_beside_ok(s_.post)) {  // into the deltas, beside the GEMM
    const int64_t W = out_cols(in);
    if (s_.delta.size() < size_t(T * W)) s_.delta.assign(size_t(T * W), 0.f);  // else zero already
    for (int i = 0; i < n_sites; ++i) {
      s_.sites[i].y = s_.delta.data() + s_.site_col[i];
      s_.sites[i].ldy = W;
    }
    if (be_->lora_mix_beside(s_.post, s_.ws.get())) {
      s_.pending = Scratch::Pending::Beside;
      s_.delta_ld = W;
      s_.delta_rows.clear();
      const size_t nb = block_cols_.size();
      for (int64_t t = 0; t < T; ++t)
        if (std::any_of(s_.uses.begin() + int64_t(size_t(t) * nb), s_.uses.begin() + int64_t(size_t(t + 1) * nb),
                        [](uint8_t u) { return u != 0; }))
          s_.delta_rows.push_back(int32_t(t));
      return true;
    }
  }
  s_.pending = Scratch::Pending::After;  // finish() runs it into y
  return true;
}

void ExpertShard::abandon() const {
  const Scratch::Pending pending = std::exchange(s_.pending, Scratch::Pending::None);
  if (pending != Scratch::Pending::Beside) return;
  be_->lora_mix_cancel();  // not run if no thread took it; finished if one did
  for (int32_t t : s_.delta_rows) std::fill_n(s_.delta.begin() + int64_t(t) * s_.delta_ld, s_.delta_ld, 0.f);
}

ExpertShard::~ExpertShard() {
  abandon();
}

void ExpertShard::finish(float* y, int64_t ldy) const {
  const Scratch::Pending pending = std::exchange(s_.pending, Scratch::Pending::None);
  if (pending == Scratch::Pending::None) return;
  const int n_sites = int(s_.post.n_sites);
  if (pending == Scratch::Pending::After) {  // not beside the GEMM: now, into y
    for (int i = 0; i < n_sites; ++i) {
      s_.sites[i].y = y + s_.site_col[i];
      s_.sites[i].ldy = ldy;
    }
    be_->lora_mix(s_.post, s_.ws.get());
    return;
  }
  be_->lora_mix_join();
  // The posted sites' columns of each row that used a block: y += Δ, and Δ = 0 again.
  for (int32_t t : s_.delta_rows)
    for (int i = 0; i < n_sites; ++i) {
      const int64_t col = s_.site_col[i];
      float* d = s_.delta.data() + int64_t(t) * s_.delta_ld + col;
      float* yr = y + int64_t(t) * ldy + col;
      for (int64_t j = 0; j < s_.sites[i].d_out; ++j) {
        yr[j] += d[j];
        d[j] = 0.f;
      }
    }
}

std::unique_ptr<ExpertShard> adapter_shard(const ShardSpec& base, const std::string& name, const std::string& dir) {
  Bundle b;
  b.dir = dir;
  b.manifest = dir;
  b.method = "at-moe";
  b.groups.push_back({name, {0}});
  b.experts.push_back({name, dir, 0});
  ShardSpec spec = base;
  spec.groups = {0};
  spec.general = false;
  return std::make_unique<ExpertShard>(b, spec);
}

}  // namespace atmoe
