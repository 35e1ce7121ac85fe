// trainer/model.h — the MSA transformer LM of the trainer: named configurations, the MSA attention
// layer (main branch + index branch, modes dense / warmup / sparse) and a GQA decoder (RMSNorm,
// RoPE, SwiGLU, tied embeddings) whose first dense_layers layers always attend densely.
// Parameters are plain tensors in a fixed, named order (checkpoints and the optimizer walk it).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace msa::train {

using at::Tensor;

struct ModelConfig {
  int64_t vocab = 264;  // 259 byte-level tokens padded to a multiple of 8
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t h_q = 4, h_kv = 1, d_head = 64;  // the CUDA kernels need d_head in {64, 128}
  int64_t d_idx = 64;                      // index head dim (64 or 128)
  int64_t d_ff = 384;                      // SwiGLU hidden size
  int64_t dense_layers = 0;                // the first L layers never use the sparse path
  int64_t bk = 64, topk = 8;               // block size and blocks kept per (query, group)
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
};

struct TrainConfig {
  std::string name;
  ModelConfig model;
  int64_t seq_len = 1024;
  int64_t batch = 1;  // sequences per step
  int64_t steps = 200;
  double lr = 3e-3, min_lr_ratio = 0.1;  // peak LR; cosine decays to min_lr_ratio * lr
  int64_t lr_warmup_steps = 20;
  double weight_decay = 0.1;
  double beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8;
  double clip = 1.0;                 // global grad-norm clip, applied to the LM and index params separately
  double index_lr = 3e-3;            // peak LR of the index projections (same schedule)
  double kl_lambda = 1.0;            // loss = LM + kl_lambda * sum over layers of L_KL
  int64_t warmup_tokens = 0;         // T_warm of msa-pt / msa-cpt (0: route default, 20% of the tokens)
  double retrieval_fraction = 0.25;  // share of retrieval documents in the training mix
  int64_t log_every = 10;
  int64_t eval_every = 0;     // 0: validation only at the end
  int64_t save_every = 0;     // 0: checkpoint only at the end
  int64_t valid_samples = 8;  // validation sequences for the end-of-run (and periodic) loss
};

// The named configurations: tiny (CPU, default) and the GPU ones. Throws msa::Error (listing the
// names) for an unknown name.
TrainConfig named_config(const std::string& name);
std::vector<std::string> config_names();
std::string describe(const ModelConfig& m);  // one line, for logs and checkpoints

enum class AttnMode { dense, warmup, sparse };
const char* mode_name(AttnMode m);

// What one layer saw, for recall and heat-maps (filled only when a Trace is passed).
struct LayerTrace {
  Tensor q, k, v;       // [n, h_q, d], [n, h_kv, d] (q, k after RoPE; main branch)
  Tensor q_idx, k_idx;  // [n, h_kv, d_idx], [n, d_idx] after norm and RoPE (undefined for dense layers/mode)
  Tensor topk_idx;      // [n, h_kv, topk] the index selection (sparse mode), else undefined
};
using Trace = std::vector<LayerTrace>;

// How generation stores the index keys of MSA layers (msa/decode.h, IndexKeyFormat): native is
// the attention dtype (bf16 on CUDA, the model's dtype on the CPU; `--index-cache bf16`); fp8 is
// one float8_e4m3fn byte per element plus a float32 scale per token, quantized by append_kv, which
// halves what the decode index pass reads and makes its selection approximate.
enum class IndexCache { native, fp8 };
const char* index_cache_name(IndexCache f);  // "bf16" (native) or "fp8", the --index-cache values

// Paged K/V caches of one sequence for generation (inference only; generate.h drives them). A
// page is a block of bk tokens (msa/decode.h); per layer k, v [n_pages, bk, h_kv, d] after RoPE in
// the attention dtype, and k_idx [n_pages, bk, d_idx] for MSA layers run sparse (else undefined):
// the attention dtype, or float8_e4m3fn with its scales k_idx_scale float32 [n_pages, bk]
// (IndexCache::fp8; otherwise k_idx_scale is undefined).
struct KvCache {
  struct Layer {
    Tensor k, v, k_idx, k_idx_scale;
  };
  std::vector<Layer> layers;
  Tensor block_table;                // int32 [1, n_pages], on the model's device
  Tensor seq_lens;                   // int32 [1]: tokens in the cache
  int64_t len = 0;                   // host copy of seq_lens
  int64_t capacity = 0;              // n_pages * bk
  AttnMode mode = AttnMode::sparse;  // of the MSA layers: sparse or dense
  IndexCache index = IndexCache::native;
};

struct ForwardOut {
  Tensor logits;  // [n, vocab] float32
  Tensor kl;      // float64 0-dim: sum over MSA layers of L_KL (0 in dense mode; NaN when not computed)
};

class LM {
 public:
  // Parameters on `device`, float32, initialised from `seed` (deterministic).
  LM(const ModelConfig& cfg, uint64_t seed, at::Device device);

  // tokens: int64 [n] packed sequences; cu_seqlens int32 [batch + 1] on the model's device.
  // want_kl_value = false skips the KL forward (gradient still exact; ForwardOut::kl is NaN).
  ForwardOut forward(const Tensor& tokens, const Tensor& cu_seqlens, AttnMode mode, bool want_kl_value,
                     Trace* trace = nullptr) const;

  // Generation over a KV cache (no gradient). new_cache: empty caches for up to `capacity` tokens;
  // mode sparse runs MSA layers through the index selection, dense (or warmup) attends densely.
  // prefill: the forward over tokens [n] (one sequence) appended to an empty cache; returns the
  // logits [n, vocab]. decode_step: one token [1] at position cache.len, appended and attended
  // over the cache (MSA layers: decode_index_topk + decode_attention; dense ones: dense over the
  // cached tokens); returns its logits [1, vocab]. Both equal forward's rows on the same sequence
  // with the native index cache; with IndexCache::fp8 the prompt still runs the forward (its index
  // keys are quantized into the cache) and the decode steps select from the quantized keys.
  KvCache new_cache(int64_t capacity, AttnMode mode, IndexCache index = IndexCache::native) const;
  Tensor prefill(const Tensor& tokens, KvCache& cache) const;
  Tensor decode_step(const Tensor& token, KvCache& cache) const;

  const ModelConfig& config() const { return cfg_; }
  // (name, tensor) in a fixed order; the tensors are the leaves that require grad.
  const std::vector<std::pair<std::string, Tensor>>& params() const { return params_; }
  static bool is_index_param(const std::string& name);  // trained by the KL only
  // Fresh index projections and norms from seed (the MSA-CPT conversion of a dense model).
  void reset_index_params(uint64_t seed);
  int64_t num_params(bool include_index) const;
  at::Device device() const { return device_; }

 private:
  const Tensor& p(const std::string& name) const;
  ModelConfig cfg_;
  at::Device device_;
  std::vector<std::pair<std::string, Tensor>> params_;
};

}  // namespace msa::train
