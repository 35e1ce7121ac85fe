// msa_torch.h — the msa operators on at::Tensor, for C++ users of PyTorch (link libmsa_torch).
// The same functions are registered as torch.ops.msa.* for the CPU and CUDA dispatch keys; called
// directly they pick the backend from the device of their first tensor. No autograd here: the
// gradients are separate operators (*_bwd), and python/msa_torch wires them into autograd.
//
// Tensors are packed ("THD") as in include/msa/*.h: q [n_q, h_q, d], k, v [n_k, h_kv, d],
// q_idx [n_q, h_kv, d_idx], k_idx [n_k, d_idx] (or [n_k, 1, d_idx]), lse [n_q, h_q] float32,
// topk_idx [n_q, h_kv, topk] int32, cu_seqlens_q/k [batch + 1] int32, q_pos [n_q] int32, all on
// the device of q. float32, bfloat16 and (CPU) float64; the CUDA kernels take bfloat16. A scale
// of 0 means the default 1/sqrt(head dim). Bad arguments throw c10::ValueError (Python
// ValueError) whose message names the operator and the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace msa_torch {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Index branch: (topk_idx int32 [n_q, h_kv, topk], block_scores float32 [n_q, h_kv, n_blocks],
// index_lse float32 [n_q, h_kv]). block_scores / index_lse are empty ([0]) unless asked for.
// n_blocks = ceil(max_seqlen_k / bk) with max_seqlen_k defaulting to n_k (an upper bound of every
// sequence's length, so the shape never depends on the contents of cu_seqlens_k).
std::tuple<Tensor, Tensor, Tensor> index_topk(const Tensor& q_idx, const Tensor& k_idx, const OptTensor& cu_seqlens_q,
                                              const OptTensor& cu_seqlens_k, const OptTensor& q_pos, int64_t bk,
                                              int64_t topk, double index_scale, bool return_block_scores,
                                              bool return_index_lse, std::optional<int64_t> max_seqlen_k);

// Top-k over given block scores [rows, n_blocks] float32: topk_idx int32 [rows, topk].
Tensor block_topk(const Tensor& scores, int64_t topk, bool force_last, const OptTensor& row_blocks);

// Main branch over the selected blocks: (o [n_q, h_q, d], lse float32 [n_q, h_q]).
std::tuple<Tensor, Tensor> sparse_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& topk_idx, const OptTensor& cu_seqlens_q,
                                                const OptTensor& cu_seqlens_k, const OptTensor& q_pos, int64_t bk,
                                                double scale);
// (dq, dk, dv) of sparse_attention_fwd, from its o and lse.
std::tuple<Tensor, Tensor, Tensor> sparse_attention_bwd(const Tensor& do_, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& o, const Tensor& lse,
                                                        const Tensor& topk_idx, const OptTensor& cu_seqlens_q,
                                                        const OptTensor& cu_seqlens_k, const OptTensor& q_pos,
                                                        int64_t bk, double scale);

// Dense causal attention: (o, lse) and its backward (dq, dk, dv).
std::tuple<Tensor, Tensor> dense_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                               const OptTensor& q_pos, double scale);
std::tuple<Tensor, Tensor, Tensor> dense_attention_bwd(const Tensor& do_, const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Tensor& o, const Tensor& lse,
                                                       const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                                       const OptTensor& q_pos, double scale);

// KL alignment loss L_KL (float64, 0-dim) on the selected blocks (topk_idx) or the full causal
// prefix (no topk_idx); lse / index_lse are optional saved statistics of the same support.
Tensor index_kl_loss(const Tensor& q, const Tensor& k, const Tensor& q_idx, const Tensor& k_idx,
                     const OptTensor& topk_idx, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                     const OptTensor& q_pos, const OptTensor& lse, const OptTensor& index_lse, int64_t bk, double scale,
                     double index_scale);
// (dq_idx, dk_idx) of lambda * L_KL; lambda_ is a 1-element tensor (the incoming gradient), 1 when
// absent. dk_idx has the shape of k_idx.
std::tuple<Tensor, Tensor> index_kl_bwd(const Tensor& q, const Tensor& k, const Tensor& q_idx, const Tensor& k_idx,
                                        const OptTensor& topk_idx, const OptTensor& cu_seqlens_q,
                                        const OptTensor& cu_seqlens_k, const OptTensor& q_pos, const OptTensor& lse,
                                        const OptTensor& index_lse, int64_t bk, double scale, double index_scale,
                                        const OptTensor& lambda_);

// Selection quality of topk_idx against the main branch: (block_recall, score_recall) as float64
// 0-dim means, then the per-row values float32 [n_q, h_kv] of each.
std::tuple<Tensor, Tensor, Tensor, Tensor> selection_recall(const Tensor& q, const Tensor& k, const Tensor& topk_idx,
                                                            const OptTensor& cu_seqlens_q,
                                                            const OptTensor& cu_seqlens_k, const OptTensor& q_pos,
                                                            int64_t bk, double scale);

// Decode over a paged KV cache (msa/decode.h; inference only). The cache: k_cache, v_cache
// [n_pages, bk, h_kv, d] and k_idx_cache [n_pages, bk, d_idx] (or [n_pages, bk, 1, d_idx]), all
// contiguous; block_table int32 [batch, max_blocks] maps logical block j of request b to a page;
// seq_lens int32 [batch] counts the tokens in the cache, this step's new ones included. The query
// tokens of request b (rows cu_seqlens_q[b] .. cu_seqlens_q[b+1], or all of them for a batch of
// one) are its last cached tokens. bk must equal the cache's page size (dim 1).
//
//
// The index-key cache either holds the calls' dtype, or is an FP8 cache (IndexKeyFormat::fp8_e4m3
// of msa/decode.h): k_idx_cache of dtype float8_e4m3fn and its scale pool k_idx_scale float32
// [n_pages, bk], contiguous, on the same device (on CUDA 16-byte aligned, as torch allocates it).
// A token's index key is then k_idx_cache[page, slot] * k_idx_scale[page, slot]. k_idx_scale is
// given exactly with an fp8 cache.
//
// Writes k, v [n_new, h_kv, d] and k_idx [n_new, d_idx] of the new tokens (packed by cu_new
// [batch + 1]) into their slots of the caches, in place. k_idx and k_idx_cache: both or neither.
// With an fp8 cache each new k_idx row is quantized (one scale per token, written to k_idx_scale).
void append_kv(const Tensor& k_cache, const Tensor& v_cache, const OptTensor& k_idx_cache, const Tensor& block_table,
               const Tensor& seq_lens, const Tensor& k, const Tensor& v, const OptTensor& k_idx,
               const OptTensor& cu_new, const OptTensor& k_idx_scale = std::nullopt);
// (topk_idx int32 [n_q, h_kv, topk] of LOGICAL block numbers, index_lse float32 [n_q, h_kv] or
// empty ([0]) unless asked for): index_topk of q_idx [n_q, h_kv, d_idx] over the cached index keys.
// With an fp8 cache (and its k_idx_scale) the query rows are quantized the same way and the
// selection approximates the native one (msa/decode.h).
std::tuple<Tensor, Tensor> decode_index_topk(const Tensor& q_idx, const Tensor& k_idx_cache, const Tensor& block_table,
                                             const Tensor& seq_lens, const OptTensor& cu_seqlens_q, int64_t bk,
                                             int64_t topk, double index_scale, bool return_index_lse,
                                             const OptTensor& k_idx_scale = std::nullopt);
// (o [n_q, h_q, d], lse float32 [n_q, h_q]): sparse attention of q over the cached blocks of topk_idx,
// or dense attention over every visible cached token when topk_idx is absent.
std::tuple<Tensor, Tensor> decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                            const Tensor& block_table, const Tensor& seq_lens,
                                            const OptTensor& topk_idx, const OptTensor& cu_seqlens_q, int64_t bk,
                                            double scale);

}  // namespace msa_torch
