// Naive float64 formulas of the msa operations (see naive.h): one query row at a time, no tricks.
#include "naive.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace msa::cli {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();

double dot(const double* a, const double* b, int64_t d) {
  double s = 0;
  for (int64_t c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

// Softmax probabilities and lse of the logits x.
double softmax(const Vec& x, Vec& prob) {
  double lse = logsumexp(x);
  prob.resize(x.size());
  for (size_t j = 0; j < x.size(); ++j) prob[j] = std::exp(x[j] - lse);
  return lse;
}
}  // namespace

void Seq::finish() {
  seq_of.assign(n_q, 0);
  pos.assign(n_q, 0);
  max_len_k = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t len_q = cu_q[b + 1] - cu_q[b];
    max_len_k = std::max(max_len_k, len_k(b));
    for (int64_t i = cu_q[b]; i < cu_q[b + 1]; ++i) {
      seq_of[i] = int32_t(b);
      pos[i] = q_pos.empty() ? int32_t(len_k(b) - len_q + (i - cu_q[b])) : q_pos[i];
    }
  }
}

Varlen Seq::varlen() const {
  Varlen v;
  v.n_q = n_q;
  v.n_k = n_k;
  v.batch = batch;
  v.cu_seqlens_q = pass_cu_q ? cu_q.data() : nullptr;
  v.cu_seqlens_k = pass_cu_k ? cu_k.data() : nullptr;
  v.q_pos = q_pos.empty() ? nullptr : q_pos.data();
  return v;
}

int64_t Seq::visible_pairs() const {
  int64_t t = 0;
  for (int64_t i = 0; i < n_q; ++i) t += pos[i] + 1;
  return t;
}

bool ranks_before(const double* m, int64_t a, int64_t b) {
  bool na = std::isnan(m[a]), nb = std::isnan(m[b]);
  if (na != nb) return nb;
  if (!na && m[a] != m[b]) return m[a] > m[b];
  return a < b;
}

std::vector<int32_t> naive_select(const double* m, int64_t n_vis, int64_t topk, bool force_last) {
  std::vector<int32_t> out;
  if (n_vis <= topk) {
    for (int64_t b = 0; b < n_vis; ++b) out.push_back(int32_t(b));
    return out;
  }
  std::vector<int64_t> cand(n_vis);
  std::iota(cand.begin(), cand.end(), 0);
  int64_t take = topk;
  if (force_last) {
    cand.pop_back();
    out.push_back(int32_t(n_vis - 1));
    --take;
  }
  std::stable_sort(cand.begin(), cand.end(), [&](int64_t a, int64_t b) { return ranks_before(m, a, b); });
  for (int64_t t = 0; t < take; ++t) out.push_back(int32_t(cand[t]));
  std::sort(out.begin(), out.end());
  return out;
}

void naive_index_scores(const Seq& s, const Vec& q_idx, const Vec& k_idx, int64_t h_kv, int64_t d_idx,
                        double index_scale, int64_t i, int64_t r, Vec& out) {
  int64_t p = s.pos[i];
  out.resize(p + 1);
  const double* qr = &q_idx[(i * h_kv + r) * d_idx];
  for (int64_t j = 0; j <= p; ++j) out[j] = dot(qr, &k_idx[s.key_row(i, j) * d_idx], d_idx) * index_scale;
}

Vec naive_block_max(const Vec& s_row, int64_t bk) {
  int64_t n = int64_t(s_row.size());
  int64_t nb = (n + bk - 1) / bk;
  Vec m(nb, std::nan(""));
  for (int64_t j = 0; j < n; ++j) {
    double x = s_row[j];
    double& mb = m[j / bk];
    if (std::isnan(x)) continue;
    if (std::isnan(mb) || x > mb) mb = x;
  }
  return m;
}

std::vector<int64_t> support_of(const int32_t* sel, int64_t topk, int64_t p, int64_t bk) {
  std::vector<int64_t> js;
  if (sel == nullptr) {
    js.resize(p + 1);
    std::iota(js.begin(), js.end(), 0);
    return js;
  }
  std::vector<int32_t> blocks;
  for (int64_t t = 0; t < topk; ++t)
    if (sel[t] >= 0) blocks.push_back(sel[t]);
  std::sort(blocks.begin(), blocks.end());
  for (int32_t b : blocks)
    for (int64_t j = int64_t(b) * bk; j < (int64_t(b) + 1) * bk && j <= p; ++j) js.push_back(j);
  return js;
}

double logsumexp(const Vec& x) {
  double m = -kInf;
  for (double v : x) m = std::max(m, v);
  if (m == -kInf) return -kInf;
  double s = 0;
  for (double v : x) s += std::exp(v - m);
  return m + std::log(s);
}

void naive_attention_forward(const Seq& s, const AttnShape& a, const Vec& q, const Vec& k, const Vec& v,
                             const int32_t* sel, Vec& o, Vec& lse) {
  int64_t g = a.h_q / a.h_kv, d = a.d;
  o.assign(s.n_q * a.h_q * d, 0.0);
  lse.assign(s.n_q * a.h_q, 0.0);
  Vec logit, prob;
  for (int64_t i = 0; i < s.n_q; ++i)
    for (int64_t r = 0; r < a.h_kv; ++r) {
      auto js = support_of(sel ? sel + (i * a.h_kv + r) * a.topk : nullptr, a.topk, s.pos[i], a.bk);
      for (int64_t h = r * g; h < (r + 1) * g; ++h) {
        const double* qh = &q[(i * a.h_q + h) * d];
        logit.resize(js.size());
        for (size_t t = 0; t < js.size(); ++t)
          logit[t] = dot(qh, &k[(s.key_row(i, js[t]) * a.h_kv + r) * d], d) * a.scale;
        lse[i * a.h_q + h] = softmax(logit, prob);
        double* oh = &o[(i * a.h_q + h) * d];
        for (size_t t = 0; t < js.size(); ++t) {
          const double* vj = &v[(s.key_row(i, js[t]) * a.h_kv + r) * d];
          for (int64_t c = 0; c < d; ++c) oh[c] += prob[t] * vj[c];
        }
      }
    }
}

void naive_attention_backward(const Seq& s, const AttnShape& a, const Vec& q, const Vec& k, const Vec& v,
                              const int32_t* sel, const Vec& dout, Vec& dq, Vec& dk, Vec& dv, const Vec* o_fwd,
                              const Vec* lse_fwd) {
  int64_t g = a.h_q / a.h_kv, d = a.d;
  dq.assign(s.n_q * a.h_q * d, 0.0);
  dk.assign(s.n_k * a.h_kv * d, 0.0);
  dv.assign(s.n_k * a.h_kv * d, 0.0);
  Vec logit, prob, dp;
  for (int64_t i = 0; i < s.n_q; ++i)
    for (int64_t r = 0; r < a.h_kv; ++r) {
      auto js = support_of(sel ? sel + (i * a.h_kv + r) * a.topk : nullptr, a.topk, s.pos[i], a.bk);
      for (int64_t h = r * g; h < (r + 1) * g; ++h) {
        const double* qh = &q[(i * a.h_q + h) * d];
        const double* doh = &dout[(i * a.h_q + h) * d];
        logit.resize(js.size());
        dp.resize(js.size());
        for (size_t t = 0; t < js.size(); ++t) {
          int64_t row = (s.key_row(i, js[t]) * a.h_kv + r) * d;
          logit[t] = dot(qh, &k[row], d) * a.scale;
          dp[t] = dot(doh, &v[row], d);
        }
        softmax(logit, prob);
        if (lse_fwd)
          for (size_t t = 0; t < js.size(); ++t) prob[t] = std::exp(logit[t] - (*lse_fwd)[i * a.h_q + h]);
        double delta = 0;  // <do, o> = sum_j p_j <do, v_j>
        if (o_fwd)
          delta = dot(doh, &(*o_fwd)[(i * a.h_q + h) * d], d);
        else
          for (size_t t = 0; t < js.size(); ++t) delta += prob[t] * dp[t];
        double* dqh = &dq[(i * a.h_q + h) * d];
        for (size_t t = 0; t < js.size(); ++t) {
          int64_t row = (s.key_row(i, js[t]) * a.h_kv + r) * d;
          double ds = prob[t] * (dp[t] - delta) * a.scale;
          for (int64_t c = 0; c < d; ++c) {
            dqh[c] += ds * k[row + c];
            dk[row + c] += ds * qh[c];
            dv[row + c] += prob[t] * doh[c];
          }
        }
      }
    }
}

namespace {
// Teacher and student distributions of (i, r) on the support js.
void kl_row(const Seq& s, const KlShape& a, const Vec& q, const Vec& k, const Vec& q_idx, const Vec& k_idx, int64_t i,
            int64_t r, const std::vector<int64_t>& js, Vec& teacher, Vec& student) {
  int64_t g = a.h_q / a.h_kv;
  Vec logit(js.size()), prob;
  teacher.assign(js.size(), 0.0);
  for (int64_t h = r * g; h < (r + 1) * g; ++h) {
    for (size_t t = 0; t < js.size(); ++t)
      logit[t] = dot(&q[(i * a.h_q + h) * a.d], &k[(s.key_row(i, js[t]) * a.h_kv + r) * a.d], a.d) * a.scale;
    softmax(logit, prob);
    for (size_t t = 0; t < js.size(); ++t) teacher[t] += prob[t] / double(g);
  }
  for (size_t t = 0; t < js.size(); ++t)
    logit[t] = dot(&q_idx[(i * a.h_kv + r) * a.d_idx], &k_idx[s.key_row(i, js[t]) * a.d_idx], a.d_idx) * a.index_scale;
  softmax(logit, student);
}
}  // namespace

double naive_kl_loss(const Seq& s, const KlShape& a, const Vec& q, const Vec& k, const Vec& q_idx, const Vec& k_idx,
                     const int32_t* sel) {
  double total = 0;
  Vec teacher, student;
  for (int64_t i = 0; i < s.n_q; ++i)
    for (int64_t r = 0; r < a.h_kv; ++r) {
      auto js = support_of(sel ? sel + (i * a.h_kv + r) * a.topk : nullptr, a.topk, s.pos[i], a.bk);
      kl_row(s, a, q, k, q_idx, k_idx, i, r, js, teacher, student);
      for (size_t t = 0; t < js.size(); ++t)
        if (teacher[t] > 0) total += teacher[t] * (std::log(teacher[t]) - std::log(student[t]));
    }
  return s.n_q == 0 ? 0.0 : total / double(s.n_q * a.h_kv);
}

void naive_kl_backward(const Seq& s, const KlShape& a, const Vec& q, const Vec& k, const Vec& q_idx, const Vec& k_idx,
                       const int32_t* sel, double lambda, Vec& dq_idx, Vec& dk_idx) {
  dq_idx.assign(s.n_q * a.h_kv * a.d_idx, 0.0);
  dk_idx.assign(s.n_k * a.d_idx, 0.0);
  if (s.n_q == 0) return;
  double norm = lambda / double(s.n_q * a.h_kv);
  Vec teacher, student;
  for (int64_t i = 0; i < s.n_q; ++i)
    for (int64_t r = 0; r < a.h_kv; ++r) {
      auto js = support_of(sel ? sel + (i * a.h_kv + r) * a.topk : nullptr, a.topk, s.pos[i], a.bk);
      kl_row(s, a, q, k, q_idx, k_idx, i, r, js, teacher, student);
      const double* qi = &q_idx[(i * a.h_kv + r) * a.d_idx];
      double* dqi = &dq_idx[(i * a.h_kv + r) * a.d_idx];
      for (size_t t = 0; t < js.size(); ++t) {
        double ds = norm * (student[t] - teacher[t]) * a.index_scale;
        int64_t row = s.key_row(i, js[t]) * a.d_idx;
        for (int64_t c = 0; c < a.d_idx; ++c) {
          dqi[c] += ds * k_idx[row + c];
          dk_idx[row + c] += ds * qi[c];
        }
      }
    }
}

Vec naive_block_mass(const Seq& s, const AttnShape& a, const Vec& q, const Vec& k, int64_t i, int64_t r) {
  int64_t g = a.h_q / a.h_kv, p = s.pos[i];
  Vec mass(p / a.bk + 1, 0.0), logit(p + 1), prob;
  for (int64_t h = r * g; h < (r + 1) * g; ++h) {
    for (int64_t j = 0; j <= p; ++j)
      logit[j] = dot(&q[(i * a.h_q + h) * a.d], &k[(s.key_row(i, j) * a.h_kv + r) * a.d], a.d) * a.scale;
    softmax(logit, prob);
    for (int64_t j = 0; j <= p; ++j) mass[j / a.bk] += prob[j] / double(g);
  }
  return mass;
}

}  // namespace msa::cli
