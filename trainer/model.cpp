// trainer/model.cpp — named configurations and the MSA transformer LM (see model.h).
#include "model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <sstream>

#include "msa/common.h"
#include "msa_torch.h"
#include "ops.h"

namespace msa::train {

namespace {

// Rotary embedding tables for one head dim: cos, sin [n, 1, dim / 2] of the positions within each
// sequence. Rotate-half layout; the index branch uses the same function as the main branch.
struct Rope {
  Tensor cos, sin;
};

Rope make_rope(const Tensor& pos, int64_t dim, double theta, at::ScalarType dt) {
  auto f64 = pos.options().dtype(at::kDouble);
  Tensor inv = at::pow(theta, -at::arange(0, dim, 2, f64) / double(dim));  // [dim/2]
  Tensor ang = pos.to(at::kDouble).unsqueeze(1) * inv.unsqueeze(0);        // [n, dim/2]
  return {ang.cos().to(dt).unsqueeze(1), ang.sin().to(dt).unsqueeze(1)};
}

Tensor apply_rope(const Tensor& x, const Rope& r) {  // x [n, h, dim]
  const int64_t half = x.size(-1) / 2;
  Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  Tensor c = r.cos.to(x.scalar_type()), s = r.sin.to(x.scalar_type());
  return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

// Normalises in at least float32 (float64 stays float64 for the gradient tests).
Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  Tensor xf = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat);
  Tensor y = xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps);
  return (y * w.to(y.scalar_type())).to(x.scalar_type());
}

std::string lname(int64_t l, const char* what) { return "layers." + std::to_string(l) + "." + what; }

}  // namespace

const char* mode_name(AttnMode m) {
  switch (m) {
    case AttnMode::dense:
      return "dense";
    case AttnMode::warmup:
      return "warmup";
    case AttnMode::sparse:
      return "sparse";
  }
  return "?";
}

std::vector<std::string> config_names() { return {"tiny", "gpu-40m-16k", "gpu-40m-32k"}; }

TrainConfig named_config(const std::string& name) {
  TrainConfig c;
  c.name = name;
  if (name == "tiny") {
    // Sized for a 2-core CPU (scripts/compare.sh): 1K-token sequences in 64-token blocks, so with
    // topk 4 a late query keeps 4 of 16 blocks and the sparse path really drops keys.
    c.model = ModelConfig{};
    c.model.topk = 4;
    c.seq_len = 1024;
    c.batch = 1;
    c.steps = 150;
    return c;
  }
  if (name == "gpu-40m-16k" || name == "gpu-40m-32k") {
    // ~37M parameters at the paper's selection shape (bk 128, topk 16: 2048 keys per query).
    ModelConfig m;
    m.d_model = 512;
    m.n_layers = 12;
    m.h_q = 8;
    m.h_kv = 2;
    m.d_head = 64;
    m.d_idx = 128;
    m.d_ff = 1536;
    m.dense_layers = 2;
    m.bk = 128;
    m.topk = 16;
    m.rope_theta = 500000.0;
    c.model = m;
    c.seq_len = name == "gpu-40m-16k" ? 16384 : 32768;
    c.batch = 1;
    c.steps = 2000;
    c.lr = 1.5e-3;
    c.index_lr = 1.5e-3;
    c.lr_warmup_steps = 100;
    c.log_every = 10;
    c.valid_samples = 4;
    return c;
  }
  std::string all;
  for (auto& n : config_names()) all += (all.empty() ? "" : ", ") + n;
  throw Error("msa train: unknown config '" + name + "', expected one of " + all);
}

std::string describe(const ModelConfig& m) {
  std::ostringstream os;
  os << "d_model " << m.d_model << ", layers " << m.n_layers << " (first " << m.dense_layers << " dense), h_q " << m.h_q
     << ", h_kv " << m.h_kv << ", d " << m.d_head << ", d_idx " << m.d_idx << ", d_ff " << m.d_ff << ", bk " << m.bk
     << ", topk " << m.topk << ", vocab " << m.vocab;
  return os.str();
}

bool LM::is_index_param(const std::string& name) { return name.find(".idx_") != std::string::npos; }

LM::LM(const ModelConfig& cfg, uint64_t seed, at::Device device) : cfg_(cfg), device_(device) {
  const ModelConfig& c = cfg_;
  if (c.h_q % c.h_kv != 0) throw Error("msa model: h_q = " + std::to_string(c.h_q) + " is not a multiple of h_kv");
  if (c.d_head % 2 || c.d_idx % 2) throw Error("msa model: d_head and d_idx must be even (RoPE)");
  const double std0 = 0.02, std_out = 0.02 / std::sqrt(2.0 * double(c.n_layers));
  // Matrices are drawn below, once all names are known.
  auto mat = [&](const std::string& n, int64_t rows, int64_t cols) { params_.push_back({n, at::empty({rows, cols})}); };
  auto vec = [&](const std::string& n, int64_t size) { params_.push_back({n, at::ones({size})}); };
  mat("embed", c.vocab, c.d_model);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    vec(lname(l, "attn_norm"), c.d_model);
    mat(lname(l, "wq"), c.h_q * c.d_head, c.d_model);
    mat(lname(l, "wk"), c.h_kv * c.d_head, c.d_model);
    mat(lname(l, "wv"), c.h_kv * c.d_head, c.d_model);
    mat(lname(l, "wo"), c.d_model, c.h_q * c.d_head);
    if (l >= c.dense_layers) {
      mat(lname(l, "idx_wq"), c.h_kv * c.d_idx, c.d_model);
      mat(lname(l, "idx_wk"), c.d_idx, c.d_model);
      vec(lname(l, "idx_q_norm"), c.d_idx);
      vec(lname(l, "idx_k_norm"), c.d_idx);
    }
    vec(lname(l, "mlp_norm"), c.d_model);
    mat(lname(l, "w_gate"), c.d_ff, c.d_model);
    mat(lname(l, "w_up"), c.d_ff, c.d_model);
    mat(lname(l, "w_down"), c.d_model, c.d_ff);
  }
  vec("final_norm", c.d_model);
  // Each matrix draws from its own generator seeded by (seed, its position), so a tensor's values
  // do not depend on which others exist; reset_index_params redraws the index ones the same way.
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& [n, t] = params_[i];
    if (t.dim() == 2) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003ull + i);
      const bool out = n.ends_with("wo") || n.ends_with("w_down");
      t.normal_(0.0, out ? std_out : std0, gen);
    }
    t = t.to(device_).set_requires_grad(true);
  }
}

void LM::reset_index_params(uint64_t seed) {
  at::NoGradGuard ng;
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& [n, t] = params_[i];
    if (!is_index_param(n)) continue;
    if (t.dim() == 2) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003ull + i);
      t.copy_(at::empty(t.sizes()).normal_(0.0, 0.02, gen));
    } else {
      t.fill_(1.0);
    }
  }
}

int64_t LM::num_params(bool include_index) const {
  int64_t n = 0;
  for (auto& [name, t] : params_)
    if (include_index || !is_index_param(name)) n += t.numel();
  return n;
}

const Tensor& LM::p(const std::string& name) const {
  for (auto& [n, t] : params_)
    if (n == name) return t;
  throw Error("msa model: no parameter " + name);
}

ForwardOut LM::forward(const Tensor& tokens, const Tensor& cu_seqlens, AttnMode mode, bool want_kl_value,
                       Trace* trace) const {
  const ModelConfig& c = cfg_;
  const int64_t n = tokens.size(0);
  // Positions within each sequence (RoPE and the kernels' block numbering agree on them).
  Tensor cu_cpu = cu_seqlens.to(at::kCPU, at::kLong);
  std::vector<int64_t> pos_v(n);
  for (int64_t b = 0; b + 1 < cu_cpu.size(0); ++b) {
    const int64_t s = cu_cpu[b].item<int64_t>(), e = cu_cpu[b + 1].item<int64_t>();
    for (int64_t i = s; i < e; ++i) pos_v[i] = i - s;
  }
  Tensor pos = at::tensor(pos_v, at::kLong).to(device_);
  const at::ScalarType pdt = params_[0].second.scalar_type();
  // The msa CUDA kernels take bfloat16; the CPU reference runs in the parameters' precision.
  const at::ScalarType adt = device_.is_cuda() ? at::kBFloat16 : pdt;
  Rope rope_main = make_rope(pos, c.d_head, c.rope_theta, at::kFloat);
  Rope rope_idx = make_rope(pos, c.d_idx, c.rope_theta, at::kFloat);
  const std::optional<Tensor> cu(cu_seqlens);
  if (trace) trace->assign(c.n_layers, LayerTrace{});

  Tensor x = at::embedding(p("embed"), tokens);  // [n, d_model]
  Tensor kl_sum = at::zeros({}, x.options().dtype(at::kDouble));
  const bool need_kl = want_kl_value || at::GradMode::is_enabled();
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const AttnMode m = l < c.dense_layers ? AttnMode::dense : mode;
    Tensor h = rms_norm(x, p(lname(l, "attn_norm")), c.norm_eps);
    Tensor q = apply_rope(at::linear(h, p(lname(l, "wq"))).view({n, c.h_q, c.d_head}), rope_main).to(adt);
    Tensor k = apply_rope(at::linear(h, p(lname(l, "wk"))).view({n, c.h_kv, c.d_head}), rope_main).to(adt);
    Tensor v = at::linear(h, p(lname(l, "wv"))).view({n, c.h_kv, c.d_head}).to(adt);
    Tensor o;
    LayerTrace* tr = trace ? &(*trace)[l] : nullptr;
    if (tr) {
      tr->q = q.detach();
      tr->k = k.detach();
      tr->v = v.detach();
    }
    if (m == AttnMode::dense) {
      o = dense_attention(q, k, v, cu).first;
    } else {
      // The index branch reads stopgrad(x): the KL trains its projections and nothing else.
      Tensor hd = h.detach();
      Tensor qi = at::linear(hd, p(lname(l, "idx_wq"))).view({n, c.h_kv, c.d_idx});
      qi = apply_rope(rms_norm(qi, p(lname(l, "idx_q_norm")), c.norm_eps), rope_idx).to(adt);
      Tensor ki = at::linear(hd, p(lname(l, "idx_wk"))).view({n, 1, c.d_idx});
      ki = apply_rope(rms_norm(ki, p(lname(l, "idx_k_norm")), c.norm_eps), rope_idx).view({n, c.d_idx}).to(adt);
      Tensor lse, kl;
      if (m == AttnMode::warmup) {
        std::tie(o, lse) = dense_attention(q, k, v, cu);
        if (need_kl) kl = index_kl(q, k, qi, ki, std::nullopt, cu, lse, std::nullopt, c.bk, 0.0, 0.0, want_kl_value);
      } else {
        auto [topk_idx, scores, index_lse] = msa_torch::index_topk(qi.detach(), ki.detach(), cu, cu, std::nullopt, c.bk,
                                                                   c.topk, 0.0, false, true, std::nullopt);
        std::tie(o, lse) = sparse_attention(q, k, v, topk_idx, cu, c.bk);
        if (need_kl) kl = index_kl(q, k, qi, ki, topk_idx, cu, lse, index_lse, c.bk, 0.0, 0.0, want_kl_value);
        if (tr) tr->topk_idx = topk_idx;
      }
      if (tr) {
        tr->q_idx = qi.detach();
        tr->k_idx = ki.detach();
      }
      if (kl.defined()) kl_sum = kl_sum + kl;
    }
    x = x + at::linear(o.reshape({n, c.h_q * c.d_head}).to(h.scalar_type()), p(lname(l, "wo")));
    Tensor h2 = rms_norm(x, p(lname(l, "mlp_norm")), c.norm_eps);
    Tensor gate = at::silu(at::linear(h2, p(lname(l, "w_gate"))));
    x = x + at::linear(gate * at::linear(h2, p(lname(l, "w_up"))), p(lname(l, "w_down")));
  }
  x = rms_norm(x, p("final_norm"), c.norm_eps);
  Tensor logits = at::linear(x, p("embed"));
  if (logits.scalar_type() != at::kDouble) logits = logits.to(at::kFloat);
  return {logits, kl_sum};
}

const char* index_cache_name(IndexCache f) { return f == IndexCache::fp8 ? "fp8" : "bf16"; }

KvCache LM::new_cache(int64_t capacity, AttnMode mode, IndexCache index) const {
  const ModelConfig& c = cfg_;
  if (capacity < 1) throw Error("msa generate: cache capacity " + std::to_string(capacity) + ", expected >= 1");
  KvCache cache;
  cache.mode = mode == AttnMode::sparse ? AttnMode::sparse : AttnMode::dense;
  cache.index = index;
  const int64_t n_pages = (capacity + c.bk - 1) / c.bk;
  cache.capacity = n_pages * c.bk;
  const at::ScalarType pdt = params_[0].second.scalar_type();
  auto opt = at::TensorOptions().device(device_).dtype(device_.is_cuda() ? at::kBFloat16 : pdt);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    KvCache::Layer L;
    L.k = at::zeros({n_pages, c.bk, c.h_kv, c.d_head}, opt);
    L.v = at::zeros({n_pages, c.bk, c.h_kv, c.d_head}, opt);
    if (l >= c.dense_layers && cache.mode == AttnMode::sparse) {
      if (index == IndexCache::fp8) {
        L.k_idx = at::zeros({n_pages, c.bk, c.d_idx}, opt.dtype(at::kFloat8_e4m3fn));
        L.k_idx_scale = at::zeros({n_pages, c.bk}, opt.dtype(at::kFloat));
      } else {
        L.k_idx = at::zeros({n_pages, c.bk, c.d_idx}, opt);
      }
    }
    cache.layers.push_back(L);
  }
  // Pages in order: one sequence owns the whole pool, so the table is the identity.
  auto i32 = at::TensorOptions().dtype(at::kInt);
  cache.block_table = at::arange(n_pages, i32).view({1, n_pages}).to(device_);
  cache.seq_lens = at::zeros({1}, i32).to(device_);
  return cache;
}

namespace {

void grow(KvCache& cache, int64_t n) {
  if (cache.len + n > cache.capacity)
    throw Error("msa generate: " + std::to_string(cache.len + n) + " tokens exceed the cache capacity " +
                std::to_string(cache.capacity));
  cache.len += n;
  cache.seq_lens.fill_(cache.len);
}

}  // namespace

Tensor LM::prefill(const Tensor& tokens, KvCache& cache) const {
  if (cache.len != 0)
    throw Error("msa generate: prefill needs an empty cache (it holds " + std::to_string(cache.len) + " tokens)");
  const int64_t n = tokens.size(0);
  if (n < 1) throw Error("msa generate: empty prompt, expected at least one token");
  at::NoGradGuard ng;
  Trace trace;
  Tensor cu = at::tensor(std::vector<int32_t>{0, int32_t(n)}, at::kInt).to(device_);
  ForwardOut out = forward(tokens, cu, cache.mode, false, &trace);
  grow(cache, n);
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    KvCache::Layer& L = cache.layers[l];
    const LayerTrace& t = trace[l];
    std::optional<Tensor> ki, kic, kis;
    if (L.k_idx.defined()) ki = t.k_idx, kic = L.k_idx;
    if (L.k_idx_scale.defined()) kis = L.k_idx_scale;
    msa_torch::append_kv(L.k, L.v, kic, cache.block_table, cache.seq_lens, t.k.contiguous(), t.v.contiguous(), ki,
                         std::nullopt, kis);
  }
  return out.logits;
}

// The layer math of forward() for one new token; the KV-cache test checks that both agree.
Tensor LM::decode_step(const Tensor& token, KvCache& cache) const {
  const ModelConfig& c = cfg_;
  if (token.dim() != 1 || token.size(0) != 1)
    throw Error("msa generate: decode_step takes one token (int64 [1]), got " + std::to_string(token.numel()));
  at::NoGradGuard ng;
  const int64_t pos = cache.len;
  grow(cache, 1);
  Tensor pos_t = at::full({1}, pos, at::kLong).to(device_);
  const at::ScalarType pdt = params_[0].second.scalar_type();
  const at::ScalarType adt = device_.is_cuda() ? at::kBFloat16 : pdt;
  Rope rope_main = make_rope(pos_t, c.d_head, c.rope_theta, at::kFloat);
  Rope rope_idx = make_rope(pos_t, c.d_idx, c.rope_theta, at::kFloat);

  Tensor x = at::embedding(p("embed"), token);  // [1, d_model]
  for (int64_t l = 0; l < c.n_layers; ++l) {
    KvCache::Layer& L = cache.layers[l];
    Tensor h = rms_norm(x, p(lname(l, "attn_norm")), c.norm_eps);
    Tensor q = apply_rope(at::linear(h, p(lname(l, "wq"))).view({1, c.h_q, c.d_head}), rope_main).to(adt);
    Tensor k = apply_rope(at::linear(h, p(lname(l, "wk"))).view({1, c.h_kv, c.d_head}), rope_main).to(adt);
    Tensor v = at::linear(h, p(lname(l, "wv"))).view({1, c.h_kv, c.d_head}).to(adt).contiguous();
    Tensor o;
    if (L.k_idx.defined()) {
      Tensor qi = at::linear(h, p(lname(l, "idx_wq"))).view({1, c.h_kv, c.d_idx});
      qi = apply_rope(rms_norm(qi, p(lname(l, "idx_q_norm")), c.norm_eps), rope_idx).to(adt);
      Tensor ki = at::linear(h, p(lname(l, "idx_wk"))).view({1, 1, c.d_idx});
      ki = apply_rope(rms_norm(ki, p(lname(l, "idx_k_norm")), c.norm_eps), rope_idx).view({1, c.d_idx}).to(adt);
      std::optional<Tensor> kis;
      if (L.k_idx_scale.defined()) kis = L.k_idx_scale;
      msa_torch::append_kv(L.k, L.v, L.k_idx, cache.block_table, cache.seq_lens, k, v, ki, std::nullopt, kis);
      Tensor topk_idx = std::get<0>(msa_torch::decode_index_topk(qi, L.k_idx, cache.block_table, cache.seq_lens,
                                                                 std::nullopt, c.bk, c.topk, 0.0, false, kis));
      o = std::get<0>(msa_torch::decode_attention(q, L.k, L.v, cache.block_table, cache.seq_lens, topk_idx,
                                                  std::nullopt, c.bk, 0.0));
    } else {
      // Dense: decode attention over every visible page (topk_idx = None), no gather of the cache.
      msa_torch::append_kv(L.k, L.v, std::nullopt, cache.block_table, cache.seq_lens, k, v, std::nullopt, std::nullopt);
      o = std::get<0>(msa_torch::decode_attention(q, L.k, L.v, cache.block_table, cache.seq_lens, std::nullopt,
                                                  std::nullopt, c.bk, 0.0));
    }
    x = x + at::linear(o.reshape({1, c.h_q * c.d_head}).to(h.scalar_type()), p(lname(l, "wo")));
    Tensor h2 = rms_norm(x, p(lname(l, "mlp_norm")), c.norm_eps);
    Tensor gate = at::silu(at::linear(h2, p(lname(l, "w_gate"))));
    x = x + at::linear(gate * at::linear(h2, p(lname(l, "w_up"))), p(lname(l, "w_down")));
  }
  x = rms_norm(x, p("final_norm"), c.norm_eps);
  Tensor logits = at::linear(x, p("embed"));
  if (logits.scalar_type() != at::kDouble) logits = logits.to(at::kFloat);
  return logits;
}

}  // namespace msa::train
