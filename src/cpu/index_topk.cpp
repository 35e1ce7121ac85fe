// CPU reference of the index branch (MSA_SPEC "Index branch"): token scores, causal block max-pool
// and top-k block selection (index_topk), top-k over given block scores (block_topk), and the
// selection rule select_topk_row that every reference implementation shares.
//
// Shapes: q_idx [n_q, h_kv, d_idx]; k_idx [n_k, d_idx]; topk_idx [n_q, h_kv, topk];
// block_scores [n_q, h_kv, n_blocks]; index_lse [n_q, h_kv]; block_topk scores [rows, n_blocks].
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu_ops.h"
#include "cpu_util.h"

namespace msa::cpu {
namespace {

// "Block a ranks above block b": larger score first, NaN below every number (-inf included),
// equal scores (and NaN against NaN) toward the lower block. A strict weak order, so the
// standard sorts may use it.
struct RanksAbove {
  const float* m;
  bool operator()(int32_t a, int32_t b) const {
    bool nan_a = std::isnan(m[a]), nan_b = std::isnan(m[b]);
    if (nan_a != nan_b) return nan_b;
    if (!nan_a && m[a] != m[b]) return m[a] > m[b];
    return a < b;
  }
};

// Dot product with a summation order fixed by the index alone (8 interleaved partial sums),
// never by the pointers' alignment: duplicate key rows must give bitwise equal scores, or a tie
// the caller built on purpose would break by rounding noise instead of by block number.
inline double dot_fixed(const double* a, const double* b, int64_t d) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[c + u] * b[c + u];
  for (; c < d; ++c) acc[c % 8] += a[c] * b[c];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// logsumexp of s[0, n), NaN if any score is NaN (as an online softmax would give).
double logsumexp(const double* s, int64_t n) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(s[j])) return std::numeric_limits<double>::quiet_NaN();
    mx = std::max(mx, s[j]);
  }
  // All -inf (or an empty range) has no mass; +inf dominates. Both would turn into NaN below.
  if (std::isinf(mx)) return mx;
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(s[j] - mx);
  return mx + std::log(sum);
}

}  // namespace

void select_topk_row(const float* m, int64_t n_vis, int64_t topk, bool force_last, int32_t* out) {
  int64_t n_sel = 0;
  if (n_vis <= topk) {
    for (; n_sel < n_vis; ++n_sel) out[n_sel] = int32_t(n_sel);
  } else {
    // The local block is the last column: keeping it aside and appending it after the sorted
    // others keeps the output ascending.
    int64_t n_cand = force_last ? n_vis - 1 : n_vis;
    int64_t n_best = force_last ? topk - 1 : topk;
    std::vector<int32_t> cand(n_cand);
    std::iota(cand.begin(), cand.end(), 0);
    std::partial_sort(cand.begin(), cand.begin() + n_best, cand.end(), RanksAbove{m});
    std::sort(cand.begin(), cand.begin() + n_best);
    for (; n_sel < n_best; ++n_sel) out[n_sel] = cand[n_sel];
    if (force_last) out[n_sel++] = int32_t(n_vis - 1);
  }
  for (; n_sel < topk; ++n_sel) out[n_sel] = -1;
}

void index_topk(const IndexTopkParams& p, const detail::SeqInfo& s, int num_threads) {
  const int64_t n_q = s.n_q, n_k = s.n_k, h_kv = p.h_kv, d_idx = p.d_idx, bk = p.bk, topk = p.topk;
  const double scale = p.index_scale;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Converted once to contiguous double rows, so the score loop is a plain loop over memory
  // rather than a dtype switch per element. Products of f32 or bf16 values are exact in double.
  std::vector<double> q(size_t(n_q * h_kv * d_idx)), k(size_t(n_k * d_idx));
  parallel_for(n_q, num_threads, [&](int64_t i) {
    for (int64_t r = 0; r < h_kv; ++r)
      load_row(p.q_idx, p.dtype, i * p.stride_q_idx_tok + r * p.stride_q_idx_head, d_idx, &q[(i * h_kv + r) * d_idx]);
  });
  parallel_for(n_k, num_threads,
               [&](int64_t j) { load_row(p.k_idx, p.dtype, j * p.stride_k_idx_tok, d_idx, &k[j * d_idx]); });

  parallel_for(n_q * h_kv, num_threads, [&](int64_t ir) {
    const int64_t i = ir / h_kv;
    const int64_t pos = s.pos[i], n_vis = pos / bk + 1;
    const double* qi = &q[ir * d_idx];
    const double* k0 = &k[s.key_row(i, 0) * d_idx];  // the keys of i's sequence, by position

    std::vector<double> score(pos + 1);  // S over the visible positions 0..pos
    for (int64_t j = 0; j <= pos; ++j) score[j] = dot_fixed(qi, k0 + j * d_idx, d_idx) * scale;

    std::vector<float> m(n_vis);  // ranked as float: the rule is defined on the stored block scores
    for (int64_t b = 0; b < n_vis; ++b) {
      double mx = std::numeric_limits<double>::quiet_NaN();
      for (int64_t j = b * bk; j < std::min((b + 1) * bk, pos + 1); ++j)
        if (!std::isnan(score[j]) && (std::isnan(mx) || score[j] > mx)) mx = score[j];
      m[b] = float(mx);
    }

    int32_t* sel = p.topk_idx + ir * topk;
    select_topk_row(m.data(), n_vis, topk, true, sel);

    if (p.block_scores) {
      float* row = p.block_scores + ir * p.n_blocks;
      for (int64_t b = 0; b < p.n_blocks; ++b) row[b] = b < n_vis ? m[b] : neg_inf;
    }
    if (p.index_lse) {
      std::vector<double> support;  // S of the visible tokens of the selected blocks
      for (int64_t t = 0; t < topk && sel[t] >= 0; ++t)
        for (int64_t j = sel[t] * bk; j < std::min((sel[t] + 1) * bk, pos + 1); ++j) support.push_back(score[j]);
      p.index_lse[ir] = float(logsumexp(support.data(), int64_t(support.size())));
    }
  });
}

void block_topk(const BlockTopkParams& p, int num_threads) {
  parallel_for(p.rows, num_threads, [&](int64_t i) {
    int64_t n_vis = p.row_blocks ? p.row_blocks[i] : p.n_blocks;
    select_topk_row(p.scores + i * p.stride_row, n_vis, p.topk, p.force_last, p.topk_idx + i * p.topk);
  });
}

}  // namespace msa::cpu
