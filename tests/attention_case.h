// AttentionCase: one main-branch attention problem (varlen layout, heads, selection, inputs kept
// as doubles) shared by the forward and backward tests, with the core params and calls it implies.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "test_util.h"

namespace msa::test {

// Inputs are contiguous doubles already rounded to dtype, so a reference computed from them sees
// exactly what the library sees.
struct AttentionCase {
  int64_t h_q = 4, h_kv = 2, d = 16;
  int64_t bk = 64, topk = 0;  // topk == 0: dense
  DType dtype = DType::f32;
  std::vector<int32_t> cu_q, cu_k;  // [batch+1]
  std::vector<int32_t> q_pos;       // [n_q]; empty: bottom-right aligned
  std::vector<double> q, k, v;      // [n_q, h_q, d], [n_k, h_kv, d], [n_k, h_kv, d]
  std::vector<int32_t> idx;         // [n_q, h_kv, topk] when sparse

  int64_t n_q() const { return cu_q.back(); }
  int64_t n_k() const { return cu_k.back(); }
  int64_t batch() const { return int64_t(cu_q.size()) - 1; }
  int64_t g() const { return h_q / h_kv; }
  int64_t seq(int64_t i) const {
    int64_t b = 0;
    while (cu_q[b + 1] <= i) ++b;
    return b;
  }
  int64_t len_k(int64_t b) const { return cu_k[b + 1] - cu_k[b]; }
  int64_t pos(int64_t i) const {
    if (!q_pos.empty()) return q_pos[i];
    int64_t b = seq(i);
    return len_k(b) - (cu_q[b + 1] - cu_q[b]) + (i - cu_q[b]);
  }
  // The scale the library uses by default: 1/sqrt(d) rounded to float.
  double scale() const { return double(float(1.0 / std::sqrt(double(d)))); }
};

// Everything of P's call but the tensor pointers, which belong to the caller's buffers.
template <class Params = AttentionParams>
Params case_params(const AttentionCase& P) {
  Params a;
  a.seq.n_q = P.n_q();
  a.seq.n_k = P.n_k();
  a.seq.batch = P.batch();
  a.seq.cu_seqlens_q = P.cu_q.data();
  a.seq.cu_seqlens_k = P.cu_k.data();
  a.seq.q_pos = P.q_pos.empty() ? nullptr : P.q_pos.data();
  a.h_q = P.h_q;
  a.h_kv = P.h_kv;
  a.d = P.d;
  a.dtype = P.dtype;
  a.bk = P.bk;
  a.topk = P.topk;
  a.topk_idx = P.topk > 0 ? P.idx.data() : nullptr;
  return a;
}

// The forward P implies (sparse when it has a selection); num_threads 0: the library's default.
inline void case_forward(const AttentionCase& P, const AttentionParams& a, int num_threads) {
  Exec ex;
  ex.num_threads = num_threads;
  if (P.topk > 0)
    sparse_attention_forward(a, ex);
  else
    dense_attention_forward(a, ex);
}

// The backward P implies, like case_forward.
inline void case_backward(const AttentionCase& P, const AttentionBwdParams& a, int num_threads) {
  Exec ex;
  ex.num_threads = num_threads;
  if (P.topk > 0)
    sparse_attention_backward(a, ex);
  else
    dense_attention_backward(a, ex);
}

}  // namespace msa::test
