// Naive float64 formulas of every msa operation, written from the spec for `msa check` and
// `msa demo`; deliberately independent of src/cpu so the two can disagree. Slow and plain.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "msa/msa.h"

namespace msa::cli {

using Vec = std::vector<double>;

// Host description of a varlen layout, with the positions resolved the way the API resolves them.
struct Seq {
  int64_t n_q = 0, n_k = 0, batch = 1;
  std::vector<int32_t> cu_q, cu_k;  // [batch+1], always filled
  std::vector<int32_t> q_pos;       // [n_q] explicit positions; empty: bottom-right aligned
  bool pass_cu_q = true;            // false: hand nullptr to the API (batch == 1)
  bool pass_cu_k = true;            // false: hand nullptr (cu_k == cu_q)
  std::string desc;                 // human-readable summary for failure lines

  // Derived by finish().
  std::vector<int32_t> seq_of, pos;  // [n_q]
  int64_t max_len_k = 0;

  void finish();
  Varlen varlen() const;
  int64_t len_k(int64_t b) const { return cu_k[b + 1] - cu_k[b]; }
  int64_t key_row(int64_t i, int64_t j) const { return cu_k[seq_of[i]] + j; }
  int64_t own_block(int64_t i, int64_t bk) const { return pos[i] / bk; }
  int64_t max_blocks(int64_t bk) const { return (max_len_k + bk - 1) / bk; }
  // Sum over queries of their visible keys (p + 1): the dense causal work.
  int64_t visible_pairs() const;
};

// Ranking of index_topk / block_topk: larger first, NaN below every number, ties to the lower index.
bool ranks_before(const double* m, int64_t a, int64_t b);

// The selection rule on one row of n_vis scores (the last is the local block when force_last):
// the valid block numbers, ascending.
std::vector<int32_t> naive_select(const double* m, int64_t n_vis, int64_t topk, bool force_last);

// Index scores S[j] = <q_idx[i, r], k_idx[j]> * index_scale for the visible j = 0..p_i.
void naive_index_scores(const Seq& s, const Vec& q_idx, const Vec& k_idx, int64_t h_kv, int64_t d_idx,
                        double index_scale, int64_t i, int64_t r, Vec& out);

// Causal block max of S (NaN-ignoring; NaN if every visible score of the block is NaN).
Vec naive_block_max(const Vec& s_row, int64_t bk);

// Visible key positions of the blocks listed in sel (positions 0..p only), or all of 0..p when
// sel is null. sel entries < 0 are padding.
std::vector<int64_t> support_of(const int32_t* sel, int64_t topk, int64_t p, int64_t bk);

// Log-sum-exp of x (-inf for an empty set).
double logsumexp(const Vec& x);

// Main-branch attention in float64 over per-(query, group) supports. sel: [n_q, h_kv, topk] or
// nullptr for dense. Outputs [n_q, h_q, d] and [n_q, h_q].
struct AttnShape {
  int64_t h_q = 0, h_kv = 0, d = 0, bk = 128, topk = 0;
  double scale = 0;
};
void naive_attention_forward(const Seq& s, const AttnShape& a, const Vec& q, const Vec& k, const Vec& v,
                             const int32_t* sel, Vec& o, Vec& lse);
// dq, dk, dv of sum(do * o); keys that no query attends get zeros. With o_fwd and lse_fwd (the
// forward outputs handed to the backward, rounded to their storage types), the formulas use them
// as a flash-attention style backward does: P = exp(s - lse_fwd), D = <do, o_fwd>.
void naive_attention_backward(const Seq& s, const AttnShape& a, const Vec& q, const Vec& k, const Vec& v,
                              const int32_t* sel, const Vec& dout, Vec& dq, Vec& dk, Vec& dv,
                              const Vec* o_fwd = nullptr, const Vec* lse_fwd = nullptr);

// KL alignment loss and its gradient (the gradient of lambda * L_KL).
struct KlShape {
  int64_t h_q = 0, h_kv = 0, d = 0, d_idx = 0, bk = 128, topk = 0;
  double scale = 0, index_scale = 0;
};
double naive_kl_loss(const Seq& s, const KlShape& a, const Vec& q, const Vec& k, const Vec& q_idx, const Vec& k_idx,
                     const int32_t* sel);
void naive_kl_backward(const Seq& s, const KlShape& a, const Vec& q, const Vec& k, const Vec& q_idx, const Vec& k_idx,
                       const int32_t* sel, double lambda, Vec& dq_idx, Vec& dk_idx);

// Group-mean dense block mass P_b of query i, group r (length own block + 1).
Vec naive_block_mass(const Seq& s, const AttnShape& a, const Vec& q, const Vec& k, int64_t i, int64_t r);

}  // namespace msa::cli
