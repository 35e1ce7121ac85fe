// CPU reference of the selection-quality metrics (paper's block recall and score recall): the
// index selection judged against the main branch's own top-k by group-mean block mass.
//
// Shapes: q [n_q, h_q, d]; k [n_k, h_kv, d]; topk_idx [n_q, h_kv, topk];
// block_recall_rows, score_recall_rows [n_q, h_kv]. Head h belongs to group r = h / g.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_ops.h"
#include "cpu_util.h"

namespace msa::cpu {

SelectionRecall selection_recall(const SelectionRecallParams& p, const detail::SeqInfo& s, int num_threads) {
  const int64_t n_q = s.n_q, n_k = s.n_k, h_q = p.h_q, h_kv = p.h_kv, d = p.d, bk = p.bk, topk = p.topk;
  const int64_t g = h_q / h_kv;
  const double scale = p.scale;

  std::vector<double> q(size_t(n_q * h_q * d)), k(size_t(n_k * h_kv * d));
  parallel_for(n_q, num_threads, [&](int64_t i) {
    for (int64_t h = 0; h < h_q; ++h)
      load_row(p.q, p.dtype, i * p.stride_q_tok + h * p.stride_q_head, d, &q[(i * h_q + h) * d]);
  });
  parallel_for(n_k, num_threads, [&](int64_t j) {
    for (int64_t r = 0; r < h_kv; ++r)
      load_row(p.k, p.dtype, j * p.stride_k_tok + r * p.stride_k_head, d, &k[(j * h_kv + r) * d]);
  });

  // Per-row values first, summed in row order afterwards, so the means do not depend on threads.
  std::vector<double> block_rows(size_t(n_q * h_kv)), score_rows(size_t(n_q * h_kv));
  parallel_for(n_q * h_kv, num_threads, [&](int64_t ir) {
    const int64_t i = ir / h_kv, r = ir % h_kv;
    const int64_t pos = s.pos[i], n_vis = pos / bk + 1;

    // Group-mean dense probabilities over the visible keys 0..pos; each head normalised alone.
    std::vector<double> prob(pos + 1, 0.0), logit(pos + 1);
    for (int64_t h = r * g; h < (r + 1) * g; ++h) {
      const double* qh = &q[(i * h_q + h) * d];
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j <= pos; ++j) {
        logit[j] = dot(qh, &k[(s.key_row(i, j) * h_kv + r) * d], d) * scale;
        mx = std::max(mx, logit[j]);
      }
      double sum = 0.0;
      for (int64_t j = 0; j <= pos; ++j) sum += std::exp(logit[j] - mx);
      for (int64_t j = 0; j <= pos; ++j) prob[j] += std::exp(logit[j] - mx) / sum / double(g);
    }
    std::vector<double> mass(n_vis, 0.0);  // P_b
    for (int64_t j = 0; j <= pos; ++j) mass[j / bk] += prob[j];

    // I* ranks float masses, as the index selection ranks float block scores.
    std::vector<float> mass_f(mass.begin(), mass.end());
    int32_t best[kMaxTopk];
    select_topk_row(mass_f.data(), n_vis, topk, true, best);

    const int32_t* sel = p.topk_idx + ir * topk;  // validated: visible, distinct, -1 only as tail
    int64_t n_best = 0, n_hit = 0;
    double mass_best = 0.0, mass_hit = 0.0;
    for (int64_t t = 0; t < topk && best[t] >= 0; ++t) {
      ++n_best;
      mass_best += mass[best[t]];
      bool hit = std::find(sel, sel + topk, best[t]) != sel + topk;
      if (hit) {
        ++n_hit;
        mass_hit += mass[best[t]];
      }
    }
    block_rows[ir] = double(n_hit) / double(n_best);
    // With topk >= 2, I* holds the heaviest block, so its mass is >= 1/n_vis. With topk = 1 it
    // holds only the local block, whose mass can underflow to 0; the mass ratio is then
    // undefined and the block ratio stands in for it.
    score_rows[ir] = mass_best > 0.0 ? mass_hit / mass_best : block_rows[ir];
  });

  SelectionRecall out;
  double block_sum = 0.0, score_sum = 0.0;
  for (int64_t ir = 0; ir < n_q * h_kv; ++ir) {
    block_sum += block_rows[ir];
    score_sum += score_rows[ir];
    if (p.block_recall_rows) p.block_recall_rows[ir] = float(block_rows[ir]);
    if (p.score_recall_rows) p.score_recall_rows[ir] = float(score_rows[ir]);
  }
  out.block_recall = block_sum / double(n_q * h_kv);
  out.score_recall = score_sum / double(n_q * h_kv);
  return out;
}

}  // namespace msa::cpu
