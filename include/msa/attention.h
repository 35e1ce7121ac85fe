// msa/attention.h — the main branch: exact softmax attention over the selected blocks (sparse)
// or over the whole causal prefix (dense, for the warm-up phase and as an oracle), forward and
// backward, GQA with g = h_q / h_kv query heads per KV head (MSA_SPEC "Main branch").
#pragma once

#include "msa/common.h"

namespace msa {

// Forward: for every head h of group r = h / g,
//   o[i, h]   = sum_j softmax_j(<q[i,h], k[j,r]> * scale) v[j,r]
//   lse[i, h] = log sum_j exp(<q[i,h], k[j,r]> * scale)         (natural log, float32)
// over the support of (i, r): the visible keys (positions 0..p_i) of the blocks listed in
// topk_idx[i, r] (sparse), or all visible keys (dense; topk_idx must be nullptr).
struct AttentionParams {
  Varlen seq;
  int64_t h_q = 0, h_kv = 0;   // h_q % h_kv == 0, g = h_q / h_kv in {1, 2, 4, 8, 16}
  int64_t d = 0;               // head dim (64 or 128)
  float scale = 0.f;           // 0: 1/sqrt(d)
  DType dtype = DType::bf16;   // of q, k, v, o (and do, dq, dk, dv in the backward)

  const void* q = nullptr;  // [n_q, h_q, d]
  int64_t stride_q_tok = 0, stride_q_head = 0;
  const void* k = nullptr;  // [n_k, h_kv, d]
  int64_t stride_k_tok = 0, stride_k_head = 0;
  const void* v = nullptr;  // [n_k, h_kv, d]
  int64_t stride_v_tok = 0, stride_v_head = 0;

  // Sparse only (nullptr for dense): the selection of index_topk.
  const int32_t* topk_idx = nullptr;  // [n_q, h_kv, topk], contiguous, -1 padded; entries must be visible blocks, no duplicates
  int64_t topk = 0;                   // 1..kMaxTopk
  int64_t bk = 128;                   // block size (64 or 128)

  void* o = nullptr;  // [n_q, h_q, d] out (forward), in (backward)
  int64_t stride_o_tok = 0, stride_o_head = 0;
  float* lse = nullptr;  // [n_q, h_q] contiguous; out (forward), in (backward)
};

// Backward: dq, dk, dv of the forward above (the selection is a constant). Uses the forward's
// o and lse. dk and dv are overwritten (keys no query attends to get zeros).
struct AttentionBwdParams : AttentionParams {
  const void* do_ = nullptr;  // [n_q, h_q, d] gradient of o
  int64_t stride_do_tok = 0, stride_do_head = 0;
  void* dq = nullptr;  // [n_q, h_q, d] out
  int64_t stride_dq_tok = 0, stride_dq_head = 0;
  void* dk = nullptr;  // [n_k, h_kv, d] out
  int64_t stride_dk_tok = 0, stride_dk_head = 0;
  void* dv = nullptr;  // [n_k, h_kv, d] out
  int64_t stride_dv_tok = 0, stride_dv_head = 0;
  // Bitwise-repeatable dq, dk, dv: the same inputs give the same bits on every call (fixed-order
  // reductions instead of float32 atomics; slower on CUDA). The CPU backend is always deterministic.
  bool deterministic = false;
};

void sparse_attention_forward(const AttentionParams& p, const Exec& ex = {});
void sparse_attention_backward(const AttentionBwdParams& p, const Exec& ex = {});
void dense_attention_forward(const AttentionParams& p, const Exec& ex = {});
void dense_attention_backward(const AttentionBwdParams& p, const Exec& ex = {});

// The one exact reason for an MSA layer to run dense attention: when no query can see more than
// topk blocks (the longest key sequence holds at most topk * bk tokens), index_topk keeps every
// visible block, so the sparse forward over its selection computes dense causal attention, and a
// layer may call dense_attention_forward and skip the index branch. Choosing dense because it is
// faster at some length changes the function (all keys instead of the selected blocks) and is
// left to the caller; docs/prefill_bench.md shows where that happens on an H100.
constexpr bool prefer_dense(int64_t max_len_k, int64_t bk, int64_t topk) { return max_len_k <= topk * bk; }

}  // namespace msa
