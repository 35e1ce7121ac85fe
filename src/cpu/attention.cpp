// CPU reference of the main branch: sparse (selected blocks) and dense causal GQA attention,
// forward and backward, computed in double (MSA_SPEC "Main branch").
//
// Shapes: q, o, do, dq [n_q, h_q, d]; k, v, dk, dv [n_k, h_kv, d]; lse [n_q, h_q];
// topk_idx [n_q, h_kv, topk]. Head h belongs to group r = h / g and reads kv head r.
//
// Every (query, group) row walks its support — the visible keys of its blocks — in ascending key
// order, whatever the order of the blocks in topk_idx. So the result does not depend on that
// order, and a sparse call that selects every visible block sums exactly like the dense call.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_ops.h"
#include "cpu_util.h"

namespace msa::cpu {
namespace {

// Dense attention has no block size of its own (p.bk is not validated for it); it is walked in
// blocks of this size only to share the code of the sparse path. Any value gives the same sums.
constexpr int64_t kDenseBlock = 128;

struct Layout {
  const AttentionParams& p;
  const detail::SeqInfo& s;
  bool sparse;
  int64_t g, bk;

  Layout(const AttentionParams& p_, const detail::SeqInfo& s_)
      : p(p_), s(s_), sparse(p_.topk_idx != nullptr), g(p_.h_q / p_.h_kv), bk(sparse ? p_.bk : kDenseBlock) {}

  // Blocks of query row i for group r, ascending: the valid entries of topk_idx[i, r] (sparse)
  // or all visible blocks (dense).
  void blocks(int64_t i, int64_t r, std::vector<int32_t>& out) const {
    out.clear();
    if (sparse) {
      const int32_t* row = p.topk_idx + (i * p.h_kv + r) * p.topk;
      for (int64_t t = 0; t < p.topk; ++t)
        if (row[t] >= 0) out.push_back(row[t]);
      std::sort(out.begin(), out.end());
    } else {
      for (int32_t b = 0; b <= s.pos[i] / bk; ++b) out.push_back(b);
    }
  }

  // Threads for one (sequence b, kv head): a parallel region costs tens of microseconds (far more
  // on a busy machine), more than a small sequence's whole work, so those run on one thread.
  int threads(int64_t b, int num_threads) const {
    int64_t len_q = s.cu_q[b + 1] - s.cu_q[b], len_k = s.len_k(b);
    int64_t keys = sparse ? std::min(p.topk * bk, len_k) : len_k;
    return len_q * keys * g * p.d < (int64_t(1) << 18) ? 1 : num_threads;
  }

  // Support of query row i for group r: key positions within its sequence, ascending.
  void support(int64_t i, int64_t r, std::vector<int32_t>& blk, std::vector<int32_t>& keys) const {
    blocks(i, r, blk);
    keys.clear();
    int64_t last = s.pos[i];  // causal: keys 0..pos; only the local block is cut by this
    for (int32_t b : blk)
      for (int64_t j = b * bk; j < std::min((b + 1) * bk, last + 1); ++j) keys.push_back(int32_t(j));
  }
};

// K and V of one (sequence, kv head) as contiguous double rows [len_k, d]. Only the blocks some
// query of the sequence uses are converted (a decode step over a long cache touches few).
struct KvRows {
  std::vector<double> k, v;

  void load(const AttentionParams& p, const detail::SeqInfo& s, int64_t b, int64_t r, int64_t bk,
            const std::vector<char>& used, int num_threads) {
    int64_t len_k = s.len_k(b), d = p.d;
    k.assign(len_k * d, 0.0);
    v.assign(len_k * d, 0.0);
    parallel_for(int64_t(used.size()), num_threads, [&](int64_t blk) {
      if (!used[blk]) return;
      for (int64_t j = blk * bk; j < std::min((blk + 1) * bk, len_k); ++j) {
        int64_t row = s.cu_k[b] + j;
        load_row(p.k, p.dtype, row * p.stride_k_tok + r * p.stride_k_head, d, &k[j * d]);
        load_row(p.v, p.dtype, row * p.stride_v_tok + r * p.stride_v_head, d, &v[j * d]);
      }
    });
  }
};

// Blocks of sequence b used by any of its queries for group r.
std::vector<char> used_blocks(const Layout& L, int64_t b, int64_t r) {
  int64_t len_k = L.s.len_k(b);
  std::vector<char> used((len_k + L.bk - 1) / L.bk, 0);
  std::vector<int32_t> blk;
  for (int64_t i = L.s.cu_q[b]; i < L.s.cu_q[b + 1]; ++i) {
    L.blocks(i, r, blk);
    for (int32_t x : blk) used[x] = 1;
  }
  return used;
}

// out[e] = <a[e], b> for n rows a[e] = a + e * d. Four rows per pass: the four sums are
// independent chains (a single dot is bound by the latency of its additions) and share each load of b.
inline void dot_rows(const double* a, int64_t n, const double* b, int64_t d, double* out) {
  int64_t e = 0;
  for (; e + 4 <= n; e += 4) {
    const double *a0 = a + e * d, *a1 = a0 + d, *a2 = a1 + d, *a3 = a2 + d;
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t c = 0; c < d; ++c) {
      s0 += a0[c] * b[c];
      s1 += a1[c] * b[c];
      s2 += a2[c] * b[c];
      s3 += a3[c] * b[c];
    }
    out[e] = s0;
    out[e + 1] = s1;
    out[e + 2] = s2;
    out[e + 3] = s3;
  }
  for (; e < n; ++e) out[e] = dot(a + e * d, b, d);
}

// dst[c] += sum_u w[u] * src[u][c] over n source rows, four per pass to load and store dst once
// per four products.
inline void axpy_rows(double* dst, const double* w, const double* const* src, int64_t n, int64_t d) {
  int64_t u = 0;
  for (; u + 4 <= n; u += 4) {
    const double *s0 = src[u], *s1 = src[u + 1], *s2 = src[u + 2], *s3 = src[u + 3];
    const double w0 = w[u], w1 = w[u + 1], w2 = w[u + 2], w3 = w[u + 3];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) dst[c] += w0 * s0[c] + w1 * s1[c] + w2 * s2[c] + w3 * s3[c];
  }
  for (; u < n; ++u) {
    const double* s0 = src[u];
    const double w0 = w[u];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) dst[c] += w0 * s0[c];
  }
}

// Per-thread scratch, reused across rows to keep allocation out of the inner loops.
struct Scratch {
  std::vector<int32_t> blk, keys;
  std::vector<double> q, o, dq, scores, sum;
};

// One (query i, group r) row of the forward: o and lse of the g heads of the group.
void forward_row(const Layout& L, const KvRows& kv, int64_t i, int64_t r, Scratch& w) {
  const AttentionParams& p = L.p;
  const int64_t d = p.d, g = L.g;
  L.support(i, r, w.blk, w.keys);
  const int64_t n_s = int64_t(w.keys.size());

  w.q.resize(g * d);
  for (int64_t e = 0; e < g; ++e)
    load_row(p.q, p.dtype, i * p.stride_q_tok + (r * g + e) * p.stride_q_head, d, &w.q[e * d]);

  // scores [n_s, g]: keys outer so each K row is read once for the g heads of the group.
  w.scores.resize(n_s * g);
  for (int64_t t = 0; t < n_s; ++t) {
    double* sc = &w.scores[t * g];
    dot_rows(w.q.data(), g, &kv.k[int64_t(w.keys[t]) * d], d, sc);
    for (int64_t e = 0; e < g; ++e) sc[e] *= double(p.scale);
  }

  // Softmax numerators exp(s - max) in place; o is normalised by their sum at the end.
  std::vector<double>& sum = w.sum;
  sum.assign(g, 0.0);
  for (int64_t e = 0; e < g; ++e) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t t = 0; t < n_s; ++t) m = std::max(m, w.scores[t * g + e]);
    for (int64_t t = 0; t < n_s; ++t) {
      double& x = w.scores[t * g + e];
      x = std::exp(x - m);
      sum[e] += x;
    }
    // An empty support (only possible for a sparse row that is all -1 padding) attends to
    // nothing: o = 0 and lse = log(0) = -inf, the neutral element of a later lse merge.
    p.lse[i * p.h_q + r * g + e] = n_s > 0 ? float(m + std::log(sum[e])) : -std::numeric_limits<float>::infinity();
  }

  // o = sum_t p_t v_t, four keys at a time, each group of V rows reused for the g heads.
  w.o.assign(g * d, 0.0);
  for (int64_t t0 = 0; t0 < n_s; t0 += 4) {
    const int64_t n4 = std::min<int64_t>(4, n_s - t0);
    const double* rows[4];
    double wt[4];
    for (int64_t u = 0; u < n4; ++u) rows[u] = &kv.v[int64_t(w.keys[t0 + u]) * d];
    for (int64_t e = 0; e < g; ++e) {
      for (int64_t u = 0; u < n4; ++u) wt[u] = w.scores[(t0 + u) * g + e];
      axpy_rows(&w.o[e * d], wt, rows, n4, d);
    }
  }
  for (int64_t e = 0; e < g; ++e) {
    double inv = n_s > 0 ? 1.0 / sum[e] : 0.0;
    int64_t off = i * p.stride_o_tok + (r * g + e) * p.stride_o_head;
    for (int64_t c = 0; c < d; ++c) store(p.o, p.dtype, off + c, w.o[e * d + c] * inv);
  }
}

// Inputs of the backward for the g heads of one (query, group) row, as double:
// q and do [g, d], lse and D = rowsum(do * o) [g], and row pointers into q and do.
struct BwdRow {
  std::vector<double> q, dout, lse, delta, o;
  std::vector<const double*> q_rows, dout_rows;

  void load(const AttentionBwdParams& p, int64_t g, int64_t i, int64_t r) {
    const int64_t d = p.d;
    q.resize(g * d);
    dout.resize(g * d);
    o.resize(d);
    lse.resize(g);
    delta.resize(g);
    q_rows.resize(g);
    dout_rows.resize(g);
    for (int64_t e = 0; e < g; ++e) {
      int64_t h = r * g + e;
      load_row(p.q, p.dtype, i * p.stride_q_tok + h * p.stride_q_head, d, &q[e * d]);
      load_row(p.do_, p.dtype, i * p.stride_do_tok + h * p.stride_do_head, d, &dout[e * d]);
      load_row(p.o, p.dtype, i * p.stride_o_tok + h * p.stride_o_head, d, o.data());
      lse[e] = p.lse[i * p.h_q + h];
      delta[e] = dot(&dout[e * d], o.data(), d);
      q_rows[e] = &q[e * d];
      dout_rows[e] = &dout[e * d];
    }
  }

  // For key row (k, v): pr[e] = P = exp(<q, k> * scale - lse), ds[e] = P * (<do, v> - D).
  void probs(const double* kr, const double* vr, int64_t g, int64_t d, double scale, double* pr, double* ds) const {
    dot_rows(q.data(), g, kr, d, pr);
    dot_rows(dout.data(), g, vr, d, ds);
    for (int64_t e = 0; e < g; ++e) {
      pr[e] = std::exp(pr[e] * scale - lse[e]);
      ds[e] = pr[e] * (ds[e] - delta[e]);
    }
  }
};

}  // namespace

void attention_forward(const AttentionParams& p, const detail::SeqInfo& s, int num_threads) {
  Layout L(p, s);
  KvRows kv;
  for (int64_t b = 0; b < s.batch; ++b) {
    int64_t q0 = s.cu_q[b], len_q = s.cu_q[b + 1] - q0;
    if (len_q == 0) continue;
    const int nt = L.threads(b, num_threads);
    for (int64_t r = 0; r < p.h_kv; ++r) {
      kv.load(p, s, b, r, L.bk, used_blocks(L, b, r), nt);
      parallel_for(len_q, nt, [&](int64_t t) {
        thread_local Scratch w;
        forward_row(L, kv, q0 + t, r, w);
      });
    }
  }
}

// P = exp(s * scale - lse) with the forward's lse; D = rowsum(do * o); dP = do . v;
// dS = P * (dP - D); dq = scale * dS k, dk = scale * dS^T q, dv = P^T do.
// dq is computed per query row (each row owns its output); dk and dv per key block, walking the
// queries that selected the block, so no two threads write the same row and no atomics are needed.
// Both passes recompute P from q, k and lse.
void attention_backward(const AttentionBwdParams& p, const detail::SeqInfo& s, int num_threads) {
  Layout L(p, s);
  const int64_t d = p.d, g = L.g;
  const double scale = p.scale;
  KvRows kv;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t q0 = s.cu_q[b], len_q = s.cu_q[b + 1] - q0;
    const int64_t k0 = s.cu_k[b], len_k = s.len_k(b);
    const int64_t n_blk = (len_k + L.bk - 1) / L.bk;
    const int nt = L.threads(b, num_threads);
    for (int64_t r = 0; r < p.h_kv; ++r) {
      kv.load(p, s, b, r, L.bk, used_blocks(L, b, r), nt);

      // dq, one (query, group) row at a time, four keys per pass over the g heads.
      parallel_for(len_q, nt, [&](int64_t t) {
        const int64_t i = q0 + t;
        thread_local Scratch w;
        thread_local BwdRow in;
        thread_local std::vector<double> pr, ds;
        in.load(p, g, i, r);
        L.support(i, r, w.blk, w.keys);
        const int64_t n_s = int64_t(w.keys.size());
        pr.resize(4 * g);
        ds.resize(4 * g);
        w.dq.assign(g * d, 0.0);
        for (int64_t t0 = 0; t0 < n_s; t0 += 4) {
          const int64_t n4 = std::min<int64_t>(4, n_s - t0);
          const double* rows[4];
          for (int64_t u = 0; u < n4; ++u) {
            rows[u] = &kv.k[int64_t(w.keys[t0 + u]) * d];
            in.probs(rows[u], &kv.v[int64_t(w.keys[t0 + u]) * d], g, d, scale, &pr[u * g], &ds[u * g]);
          }
          for (int64_t e = 0; e < g; ++e) {
            double wt[4];
            for (int64_t u = 0; u < n4; ++u) wt[u] = ds[u * g + e];
            axpy_rows(&w.dq[e * d], wt, rows, n4, d);
          }
        }
        for (int64_t e = 0; e < g; ++e) {
          int64_t off = i * p.stride_dq_tok + (r * g + e) * p.stride_dq_head;
          for (int64_t c = 0; c < d; ++c) store(p.dq, p.dtype, off + c, scale * w.dq[e * d + c]);
        }
      });

      // Queries of each key block (CSR, ascending query rows): the inverse of the selection.
      std::vector<int64_t> start(n_blk + 1, 0);
      std::vector<int32_t> blk;
      for (int64_t t = 0; t < len_q; ++t) {
        L.blocks(q0 + t, r, blk);
        for (int32_t x : blk) ++start[x + 1];
      }
      for (int64_t x = 0; x < n_blk; ++x) start[x + 1] += start[x];
      std::vector<int32_t> queries(start[n_blk]);
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t t = 0; t < len_q; ++t) {
        L.blocks(q0 + t, r, blk);
        for (int32_t x : blk) queries[fill[x]++] = int32_t(q0 + t);
      }

      // dk, dv, one key block at a time; blocks nobody selected (and keys past every query) get 0.
      parallel_for(n_blk, nt, [&](int64_t x) {
        const int64_t j0 = x * L.bk, j1 = std::min(j0 + L.bk, len_k);
        thread_local std::vector<double> dk, dv, pr, ds;
        thread_local BwdRow in;
        dk.assign((j1 - j0) * d, 0.0);
        dv.assign((j1 - j0) * d, 0.0);
        pr.resize(g);
        ds.resize(g);
        for (int64_t u = start[x]; u < start[x + 1]; ++u) {
          const int64_t i = queries[u];
          in.load(p, g, i, r);
          for (int64_t j = j0; j < std::min<int64_t>(j1, s.pos[i] + 1); ++j) {
            in.probs(&kv.k[j * d], &kv.v[j * d], g, d, scale, pr.data(), ds.data());
            for (int64_t e = 0; e < g; ++e) ds[e] *= scale;
            axpy_rows(&dv[(j - j0) * d], pr.data(), in.dout_rows.data(), g, d);
            axpy_rows(&dk[(j - j0) * d], ds.data(), in.q_rows.data(), g, d);
          }
        }
        for (int64_t j = j0; j < j1; ++j) {
          int64_t row = k0 + j;
          for (int64_t c = 0; c < d; ++c) {
            store(p.dk, p.dtype, row * p.stride_dk_tok + r * p.stride_dk_head + c, dk[(j - j0) * d + c]);
            store(p.dv, p.dtype, row * p.stride_dv_tok + r * p.stride_dv_head + c, dv[(j - j0) * d + c]);
          }
        }
      });
    }
  }
}

}  // namespace msa::cpu
