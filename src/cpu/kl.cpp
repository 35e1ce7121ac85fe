// CPU reference of the KL alignment loss (MSA_SPEC "KL alignment loss"): its value and its backward.
// Shapes: q [n_q, h_q, d], k [n_k, h_kv, d], q_idx [n_q, h_kv, d_idx], k_idx [n_k, d_idx],
// topk_idx [n_q, h_kv, topk] (or none: warm-up, full causal prefix), dq_idx like q_idx, dk_idx like k_idx.
// All math in double. One (query i, group r) pair is a "row"; its support T(i, r) is a set of key
// positions within the query's sequence.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_ops.h"
#include "cpu_util.h"

namespace msa::cpu {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Key positions of T(i, r), ascending. The blocks are sorted first: the math does not depend on
// the order of a topk_idx row, and sorting makes the rounding not depend on it either.
void support(const IndexKLParams& p, const detail::SeqInfo& s, int64_t i, int64_t r, std::vector<int64_t>& out) {
  out.clear();
  const int64_t pos = s.pos[i];
  if (p.topk_idx == nullptr) {
    for (int64_t j = 0; j <= pos; ++j) out.push_back(j);
    return;
  }
  const int32_t* row = p.topk_idx + (i * p.h_kv + r) * p.topk;
  std::vector<int64_t> blocks;
  for (int64_t t = 0; t < p.topk && row[t] >= 0; ++t) blocks.push_back(row[t]);
  std::sort(blocks.begin(), blocks.end());
  for (int64_t b : blocks)
    for (int64_t j = b * p.bk; j < std::min((b + 1) * p.bk, pos + 1); ++j) out.push_back(j);
}

double logsumexp(const std::vector<double>& x) {
  double m = kNegInf;
  for (double v : x) m = std::max(m, v);
  if (m == kNegInf) return kNegInf;
  double sum = 0.0;
  for (double v : x) sum += std::exp(v - m);
  return m + std::log(sum);
}

// The query side of a row: its g main-branch query heads, its index query, and the logsumexp of
// each head's logits (teacher) and of the index logits (student) over T(i, r).
struct QueryRow {
  std::vector<double> q;      // [g, d]
  std::vector<double> q_idx;  // [d_idx]
  std::vector<double> lse;    // [g]
  double index_lse = 0.0;
  std::vector<double> x;  // [g] scratch of probs()
};

// The key side of one key row for group r.
struct KeyRow {
  std::vector<double> k;      // [d] k[j, r]
  std::vector<double> k_idx;  // [d_idx]
};

struct Probs {
  double p, log_p;          // teacher
  double p_idx, log_p_idx;  // student
};

class KL {
 public:
  KL(const IndexKLParams& p, const detail::SeqInfo& s) : p_(p), s_(s), g_(p.h_q / p.h_kv) {}

  int64_t g() const { return g_; }

  void load_query(int64_t i, int64_t r, QueryRow& qr) const {
    qr.q.resize(g_ * p_.d);
    for (int64_t t = 0; t < g_; ++t)
      load_row(p_.q, p_.dtype, i * p_.stride_q_tok + (r * g_ + t) * p_.stride_q_head, p_.d, &qr.q[t * p_.d]);
    qr.q_idx.resize(p_.d_idx);
    load_row(p_.q_idx, p_.dtype, i * p_.stride_q_idx_tok + r * p_.stride_q_idx_head, p_.d_idx, qr.q_idx.data());
  }

  void load_key(int64_t key_row, int64_t r, KeyRow& kr) const {
    kr.k.resize(p_.d);
    load_row(p_.k, p_.dtype, key_row * p_.stride_k_tok + r * p_.stride_k_head, p_.d, kr.k.data());
    kr.k_idx.resize(p_.d_idx);
    load_row(p_.k_idx, p_.dtype, key_row * p_.stride_k_idx_tok, p_.d_idx, kr.k_idx.data());
  }

  // Teacher logits of the g heads (into t_logit[g]) and the student logit of one key.
  double logits(const QueryRow& qr, const KeyRow& kr, double* t_logit) const {
    for (int64_t t = 0; t < g_; ++t) t_logit[t] = dot(&qr.q[t * p_.d], kr.k.data(), p_.d) * double(p_.scale);
    return dot(qr.q_idx.data(), kr.k_idx.data(), p_.d_idx) * double(p_.index_scale);
  }

  // Loads the query side of row (i, r) and its lse values: taken from p.lse / p.index_lse when
  // given (the forward passes saved them over the same support), else computed over supp.
  void query_row(int64_t i, int64_t r, const std::vector<int64_t>& supp, QueryRow& qr) const {
    load_query(i, r, qr);
    qr.lse.assign(g_, 0.0);
    if (p_.lse == nullptr || p_.index_lse == nullptr) {
      const int64_t n = int64_t(supp.size());
      std::vector<std::vector<double>> t_logits(g_, std::vector<double>(n));
      std::vector<double> s_logits(n), t(g_);
      KeyRow kr;
      for (int64_t u = 0; u < n; ++u) {
        load_key(s_.key_row(i, supp[u]), r, kr);
        s_logits[u] = logits(qr, kr, t.data());
        for (int64_t h = 0; h < g_; ++h) t_logits[h][u] = t[h];
      }
      for (int64_t h = 0; h < g_; ++h) qr.lse[h] = logsumexp(t_logits[h]);
      qr.index_lse = logsumexp(s_logits);
    }
    if (p_.lse != nullptr)
      for (int64_t h = 0; h < g_; ++h) qr.lse[h] = double(p_.lse[i * p_.h_q + r * g_ + h]);
    if (p_.index_lse != nullptr) qr.index_lse = double(p_.index_lse[i * p_.h_kv + r]);
  }

  // Teacher and student probabilities of one key of a row whose lse values are known.
  Probs probs(QueryRow& qr, const KeyRow& kr) const {
    std::vector<double>& x = qr.x;
    x.resize(g_);
    Probs o;
    o.log_p_idx = logits(qr, kr, x.data()) - qr.index_lse;
    o.p_idx = std::exp(o.log_p_idx);
    // log P = logsumexp_h(x_h - lse_h) - log g stays finite (and accurate) where P underflows.
    double m = kNegInf, sum = 0.0;
    o.p = 0.0;
    for (int64_t h = 0; h < g_; ++h) {
      x[h] -= qr.lse[h];
      m = std::max(m, x[h]);
      o.p += std::exp(x[h]);
    }
    o.p /= double(g_);
    if (m == kNegInf) {
      o.log_p = kNegInf;
    } else {
      for (int64_t h = 0; h < g_; ++h) sum += std::exp(x[h] - m);
      o.log_p = m + std::log(sum) - std::log(double(g_));
    }
    return o;
  }

  // dL/dS_idx of lambda * L_KL for one key.
  double dscore(const Probs& pr) const {
    return double(p_.lambda) * (pr.p_idx - pr.p) / (double(s_.n_q) * double(p_.h_kv));
  }

 private:
  const IndexKLParams& p_;
  const detail::SeqInfo& s_;
  const int64_t g_;
};

}  // namespace

double index_kl_loss(const IndexKLParams& p, const detail::SeqInfo& s, int num_threads) {
  const KL kl(p, s);
  const int64_t rows = s.n_q * p.h_kv;
  // Per-row values summed serially afterwards: the result does not depend on the thread count.
  std::vector<double> row_kl(rows, 0.0);
  parallel_for(rows, num_threads, [&](int64_t row) {
    const int64_t i = row / p.h_kv, r = row % p.h_kv;
    std::vector<int64_t> supp;
    support(p, s, i, r, supp);
    if (supp.empty()) return;  // an all-padding selection: no distributions, no term
    QueryRow qr;
    kl.query_row(i, r, supp, qr);
    KeyRow kr;
    double sum = 0.0;
    for (int64_t j : supp) {
      kl.load_key(s.key_row(i, j), r, kr);
      Probs pr = kl.probs(qr, kr);
      if (pr.p > 0.0) sum += pr.p * (pr.log_p - pr.log_p_idx);  // 0 log 0 = 0
    }
    row_kl[row] = sum;
  });
  double total = 0.0;
  for (double v : row_kl) total += v;
  return total / (double(s.n_q) * double(p.h_kv));
}

void index_kl_backward(const IndexKLParams& p, const detail::SeqInfo& s, int num_threads) {
  const KL kl(p, s);
  const int64_t g = kl.g(), rows = s.n_q * p.h_kv;
  const double index_scale = p.index_scale;

  // Pass 1, per row: the lse values (kept for pass 2) and dq_idx = index_scale * sum_j dS[j] k_idx[j].
  std::vector<double> lse(s.n_q * p.h_q, 0.0), index_lse(rows, 0.0);
  parallel_for(rows, num_threads, [&](int64_t row) {
    const int64_t i = row / p.h_kv, r = row % p.h_kv;
    std::vector<int64_t> supp;
    support(p, s, i, r, supp);
    std::vector<double> acc(p.d_idx, 0.0);
    if (!supp.empty()) {
      QueryRow qr;
      kl.query_row(i, r, supp, qr);
      for (int64_t h = 0; h < g; ++h) lse[i * p.h_q + r * g + h] = qr.lse[h];
      index_lse[row] = qr.index_lse;
      KeyRow kr;
      for (int64_t j : supp) {
        kl.load_key(s.key_row(i, j), r, kr);
        const double ds = kl.dscore(kl.probs(qr, kr));
        for (int64_t c = 0; c < p.d_idx; ++c) acc[c] += ds * kr.k_idx[c];
      }
    }
    const int64_t off = i * p.stride_dq_idx_tok + r * p.stride_dq_idx_head;
    for (int64_t c = 0; c < p.d_idx; ++c) store(p.dq_idx, p.dtype, off + c, index_scale * acc[c]);
  });

  // Pass 2, per key row j: dk_idx[j] = index_scale * sum over rows (i, r) whose support holds j of
  // dS * q_idx[i, r]. Each key row gathers its rows in ascending (i, r) order, so there are no races
  // and the sum does not depend on the thread count. dS is recomputed by the same code as in pass 1.
  // Which rows hold key j: in warm-up, every row of its sequence at position >= j; with a
  // selection, the rows that chose j's block (an inverted block -> rows list), at position >= j.
  std::vector<int32_t> seq_of_k(s.n_k);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t j = s.cu_k[b]; j < s.cu_k[b + 1]; ++j) seq_of_k[j] = int32_t(b);
  std::vector<int64_t> blk_base;              // first global block number of each sequence
  std::vector<int64_t> holders_off, holders;  // CSR over global blocks of rows i * h_kv + r
  if (p.topk_idx != nullptr) {                // bk is validated, and used, only with a selection
    blk_base.assign(s.batch + 1, 0);
    for (int64_t b = 0; b < s.batch; ++b) blk_base[b + 1] = blk_base[b] + (s.len_k(b) + p.bk - 1) / p.bk;
    holders_off.assign(blk_base[s.batch] + 1, 0);
    auto for_each_choice = [&](auto&& f) {
      for (int64_t row = 0; row < rows; ++row) {
        const int32_t* sel = p.topk_idx + row * p.topk;
        const int64_t base = blk_base[s.seq_of_q[row / p.h_kv]];
        for (int64_t t = 0; t < p.topk && sel[t] >= 0; ++t) f(base + sel[t], row);
      }
    };
    for_each_choice([&](int64_t blk, int64_t) { ++holders_off[blk + 1]; });
    for (size_t u = 1; u < holders_off.size(); ++u) holders_off[u] += holders_off[u - 1];
    holders.resize(holders_off.back());
    std::vector<int64_t> fill(holders_off.begin(), holders_off.end() - 1);
    for_each_choice([&](int64_t blk, int64_t row) { holders[fill[blk]++] = row; });
  }

  parallel_for(s.n_k, num_threads, [&](int64_t key_row) {
    const int64_t b = seq_of_k[key_row], jp = key_row - s.cu_k[b];
    std::vector<double> acc(p.d_idx, 0.0);
    // Loaded on first use: with n_q == 0 the inputs may be null (only dk_idx is written).
    std::vector<KeyRow> kr;
    QueryRow qr;
    auto add = [&](int64_t row) {
      const int64_t i = row / p.h_kv, r = row % p.h_kv;
      if (s.pos[i] < jp) return;  // key j is in a block the query chose but after the query
      if (kr.empty()) {
        kr.resize(p.h_kv);
        for (int64_t h = 0; h < p.h_kv; ++h) kl.load_key(key_row, h, kr[h]);
      }
      kl.load_query(i, r, qr);
      qr.lse.assign(&lse[i * p.h_q + r * g], &lse[i * p.h_q + r * g] + g);
      qr.index_lse = index_lse[row];
      const double ds = kl.dscore(kl.probs(qr, kr[r]));
      for (int64_t c = 0; c < p.d_idx; ++c) acc[c] += ds * qr.q_idx[c];
    };
    if (p.topk_idx == nullptr) {
      for (int64_t row = s.cu_q[b] * p.h_kv; row < s.cu_q[b + 1] * p.h_kv; ++row) add(row);
    } else {
      const int64_t blk = blk_base[b] + jp / p.bk;
      for (int64_t u = holders_off[blk]; u < holders_off[blk + 1]; ++u) add(holders[u]);
    }
    const int64_t off = key_row * p.stride_dk_idx_tok;
    for (int64_t c = 0; c < p.d_idx; ++c) store(p.dk_idx, p.dtype, off + c, index_scale * acc[c]);
  });
}

}  // namespace msa::cpu
