// msa/kl.h — the KL alignment loss that trains the index branch toward the main branch's
// group-mean attention (MSA_SPEC "KL alignment loss"), its value and its backward.
#pragma once

#include "msa/common.h"

namespace msa {

// For each query i and group r, on the support T(i, r) = visible keys of the selected blocks
// (topk_idx set: sparse phase) or all visible keys (topk_idx == nullptr: warm-up phase):
//   teacher P[j]     = (1/g) sum_{h in r} softmax_{j in T}(<q[i,h], k[j,r]> * scale)   (constant)
//   student P_idx[j] = softmax_{j in T}(<q_idx[i,r], k_idx[j]> * index_scale)
//   L_KL = 1/(n_q * h_kv) * sum_{i,r} KL(P || P_idx)
// The backward writes dq_idx and dk_idx of lambda * L_KL:
//   dS[j] = lambda * (P_idx[j] - P[j]) / (n_q * h_kv), chained through index_scale.
struct IndexKLParams {
  Varlen seq;
  int64_t h_q = 0, h_kv = 0, d = 0, d_idx = 0;
  float scale = 0.f;          // main-branch scale; 0: 1/sqrt(d)
  float index_scale = 0.f;    // 0: 1/sqrt(d_idx)
  float lambda = 1.f;         // backward only: gradient of the total loss w.r.t. this layer's L_KL
  DType dtype = DType::bf16;  // of q, k, q_idx, k_idx, dq_idx, dk_idx

  const void* q = nullptr;  // [n_q, h_q, d] main-branch queries (teacher)
  int64_t stride_q_tok = 0, stride_q_head = 0;
  const void* k = nullptr;  // [n_k, h_kv, d] main-branch keys (teacher)
  int64_t stride_k_tok = 0, stride_k_head = 0;
  const void* q_idx = nullptr;  // [n_q, h_kv, d_idx]
  int64_t stride_q_idx_tok = 0, stride_q_idx_head = 0;
  const void* k_idx = nullptr;  // [n_k, d_idx]
  int64_t stride_k_idx_tok = 0;

  const int32_t* topk_idx = nullptr;  // [n_q, h_kv, topk] or nullptr for the full causal prefix
  int64_t topk = 0;
  int64_t bk = 128;

  // Optional saved statistics over the same support, as the forward passes produce them:
  const float* lse = nullptr;        // [n_q, h_q] main-branch lse (attention forward); nullptr: recomputed
                                     // (cpu only: the cuda backend requires it)
  const float* index_lse = nullptr;  // [n_q, h_kv] index lse (index_topk); nullptr: recomputed

  void* dq_idx = nullptr;  // [n_q, h_kv, d_idx] out (backward)
  int64_t stride_dq_idx_tok = 0, stride_dq_idx_head = 0;
  void* dk_idx = nullptr;  // [n_k, d_idx] out (backward), overwritten
  int64_t stride_dk_idx_tok = 0;
};

// Returns L_KL (not multiplied by lambda); 0 when n_q == 0. On cuda the value is copied to the host,
// which synchronises the stream.
double index_kl_loss(const IndexKLParams& p, const Exec& ex = {});
// Writes dq_idx and dk_idx of lambda * L_KL.
void index_kl_backward(const IndexKLParams& p, const Exec& ex = {});

}  // namespace msa
