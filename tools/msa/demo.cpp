// `msa demo`: MSA end to end on the CPU at a laptop-sized M3-like shape. Random inputs hide a few
// "needles" (a key far in the past that one query's index and main branches both point at); the
// demo shows the index branch finding them, sparse attention matching dense attention on those
// queries, and the attention FLOPs the selection saves.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cli.h"
#include "msa/msa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace msa::cli {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Runs one step, announcing it first so a slow step shows where the time goes.
template <class F>
void step(int k, int total, const std::string& what, F&& f) {
  std::printf("[%d/%d] %s ... ", k, total, what.c_str());
  std::fflush(stdout);
  auto t0 = Clock::now();
  f();
  std::printf("%.1f s\n", seconds_since(t0));
  std::fflush(stdout);
}

double norm2(const float* x, int64_t d) {
  double s = 0;
  for (int64_t c = 0; c < d; ++c) s += double(x[c]) * x[c];
  return s;
}

struct Needle {
  int64_t i;  // query position (single sequence: also its row)
  int64_t r;  // group
  int64_t j;  // planted key position
  int64_t b;  // its block
};

}  // namespace

int run_demo(const DemoOptions& o) {
  // M3's shape scaled down: g = 4 instead of 16 and d = d_idx = 64 instead of 128.
  const int64_t n = o.n, h_q = 16, h_kv = 4, g = h_q / h_kv, d = 64, d_idx = 64, bk = 128, topk = 16;
  const int64_t n_sample = 8;  // needle queries
  const double scale = 1.0 / std::sqrt(double(d)), index_scale = 1.0 / std::sqrt(double(d_idx));
  int threads = o.threads;
#ifdef _OPENMP
  if (threads == 0) threads = omp_get_max_threads();
#else
  threads = 1;
#endif
  Exec ex;
  ex.num_threads = o.threads;
  auto t_all = Clock::now();
  std::printf("msa demo: MiniMax Sparse Attention on the CPU (%d threads)\n", threads);
  std::printf(
      "shape: one sequence of n = %lld tokens, h_q = %lld, h_kv = %lld (g = %lld), d = d_idx = %lld, "
      "bk = %lld, topk = %lld\n",
      (long long)n, (long long)h_q, (long long)h_kv, (long long)g, (long long)d, (long long)bk, (long long)topk);
  std::printf("       each (query, group) attends to at most topk * bk = %lld of up to %lld visible tokens\n",
              (long long)(topk * bk), (long long)n);

  std::vector<float> q(n * h_q * d), k(n * h_kv * d), v(n * h_kv * d), q_idx(n * h_kv * d_idx), k_idx(n * d_idx);
  std::vector<Needle> needles;
  std::mt19937_64 rng(o.seed);
  step(1, 4, "random q, k, v, q_idx, k_idx with planted needles", [&] {
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto* t : {&q, &k, &v, &q_idx, &k_idx})
      for (float& x : *t) x = nd(rng);
    // Needle queries spread over the last ~15% of the sequence; for each of their groups a key
    // in some block at least topk blocks back, i.e. outside any same-budget local window.
    int64_t span = std::max<int64_t>(n_sample, n * 15 / 100);
    for (int64_t t = 0; t < n_sample; ++t) {
      int64_t i = n - 1 - t * (span / n_sample) - int64_t(rng() % 17);
      int64_t own = i / bk;
      for (int64_t r = 0; r < h_kv; ++r) {
        int64_t b, j;
        bool clash;
        do {  // distinct key positions, so one needle never overwrites another
          b = int64_t(rng() % uint64_t(own - topk));
          j = b * bk + int64_t(rng() % uint64_t(bk));
          clash = false;
          for (const Needle& x : needles) clash |= x.j == j;
        } while (clash);
        needles.push_back({i, r, j, b});
        // Index branch: the key's index vector points along the query's index vector, score 12
        // (random scores have unit spread, block maxima reach about 3-4).
        float* qi = &q_idx[(i * h_kv + r) * d_idx];
        double c = 12.0 / (norm2(qi, d_idx) * index_scale);
        for (int64_t x = 0; x < d_idx; ++x) k_idx[j * d_idx + x] = float(c * qi[x]);
        // Main branch: the group's query heads share a direction u and the key is a multiple of
        // u giving every head a logit of at least 20, so dense attention puts almost all its
        // mass on this one key (the other ~15000 logits add up to about e^10).
        std::vector<float> u(d);
        for (float& x : u) x = nd(rng);
        double min_dot = 1e300;
        for (int64_t h = r * g; h < (r + 1) * g; ++h) {
          float* qh = &q[(i * h_q + h) * d];
          double dt = 0;
          for (int64_t x = 0; x < d; ++x) {
            qh[x] = u[x] + 0.3f * qh[x];
            dt += double(qh[x]) * u[x];
          }
          min_dot = std::min(min_dot, dt);
        }
        double c2 = 20.0 / (std::max(min_dot, 1.0) * scale);
        for (int64_t x = 0; x < d; ++x) k[(j * h_kv + r) * d + x] = float(c2 * u[x]);
      }
    }
  });

  Varlen seq;
  seq.n_q = seq.n_k = n;
  std::vector<int32_t> topk_idx(n * h_kv * topk);
  step(2, 4,
       strf("index_topk: %lld queries x %lld groups over %lld blocks", (long long)n, (long long)h_kv,
            (long long)((n + bk - 1) / bk)),
       [&] {
         IndexTopkParams p;
         p.seq = seq;
         p.h_kv = h_kv;
         p.d_idx = d_idx;
         p.bk = bk;
         p.topk = topk;
         p.dtype = DType::f32;
         p.q_idx = q_idx.data();
         p.k_idx = k_idx.data();
         p.topk_idx = topk_idx.data();
         index_topk(p, ex);
       });

  std::vector<float> o_sparse(n * h_q * d), lse_sparse(n * h_q);
  AttentionParams ap;
  ap.seq = seq;
  ap.h_q = h_q;
  ap.h_kv = h_kv;
  ap.d = d;
  ap.dtype = DType::f32;
  ap.q = q.data();
  ap.k = k.data();
  ap.v = v.data();
  ap.bk = bk;
  ap.topk = topk;
  step(3, 4, strf("sparse_attention_forward: %lld queries x %lld heads", (long long)n, (long long)h_q), [&] {
    AttentionParams p = ap;
    p.topk_idx = topk_idx.data();
    p.o = o_sparse.data();
    p.lse = lse_sparse.data();
    sparse_attention_forward(p, ex);
  });

  // Dense attention only for the needle queries: a chunk of the sequence given by q_pos. A
  // sliding window of the same budget (the last topk blocks) shows what the selection buys.
  std::vector<int32_t> pos;
  for (const Needle& x : needles)
    if (pos.empty() || pos.back() != x.i) pos.push_back(int32_t(x.i));
  int64_t n_s = int64_t(pos.size());
  std::vector<float> q_s(n_s * h_q * d), o_dense(n_s * h_q * d), o_window(n_s * h_q * d), lse_s(n_s * h_q);
  std::vector<int32_t> window(n_s * h_kv * topk, -1);
  for (int64_t s = 0; s < n_s; ++s) {
    std::copy_n(&q[pos[s] * h_q * d], h_q * d, &q_s[s * h_q * d]);
    int64_t own = pos[s] / bk;
    for (int64_t r = 0; r < h_kv; ++r)
      for (int64_t t = 0; t < topk && own - t >= 0; ++t) window[(s * h_kv + r) * topk + t] = int32_t(own - t);
  }
  std::vector<int32_t> cu_q = {0, int32_t(n_s)}, cu_k = {0, int32_t(n)};
  step(4, 4,
       strf("dense attention and a %lld-block sliding window for the %lld needle queries", (long long)topk,
            (long long)n_s),
       [&] {
         AttentionParams p = ap;
         p.seq.n_q = n_s;
         p.seq.cu_seqlens_q = cu_q.data();
         p.seq.cu_seqlens_k = cu_k.data();
         p.seq.q_pos = pos.data();
         p.q = q_s.data();
         p.o = o_dense.data();
         p.lse = lse_s.data();
         dense_attention_forward(p, ex);
         p.topk_idx = window.data();
         p.o = o_window.data();
         sparse_attention_forward(p, ex);
       });

  std::printf("\nselected blocks (ascending; * = planted needle, (own) = the query's own block):\n");
  int64_t found = 0;
  for (const Needle& x : needles) {
    const int32_t* row = &topk_idx[(x.i * h_kv + x.r) * topk];
    bool hit = false;
    std::string line;
    for (int64_t t = 0; t < topk && row[t] >= 0; ++t) {
      hit |= row[t] == x.b;
      line += strf(" %d%s", row[t], row[t] == x.b ? "*" : row[t] == x.i / bk ? " (own)" : "");
    }
    found += hit;
    // Two queries in full are enough to read; the rest are summarised by the count below.
    if (&x - needles.data() < 2 * h_kv)
      std::printf("  query %lld group %lld: blocks%s%s\n", (long long)x.i, (long long)x.r, line.c_str(),
                  hit ? "" : strf("   <- needle in block %lld missed", (long long)x.b).c_str());
    else if (!hit)
      std::printf("  query %lld group %lld: needle in block %lld missed\n", (long long)x.i, (long long)x.r,
                  (long long)x.b);
  }
  std::printf("needles found: %lld/%zu (query, group) pairs across %lld queries\n", (long long)found, needles.size(),
              (long long)n_s);

  double num = 0, den = 0, num_w = 0, max_diff = 0;
  for (int64_t s = 0; s < n_s; ++s)
    for (int64_t e = 0; e < h_q * d; ++e) {
      double ref = o_dense[s * h_q * d + e];
      double diff = o_sparse[pos[s] * h_q * d + e] - ref, diff_w = o_window[s * h_q * d + e] - ref;
      num += diff * diff;
      num_w += diff_w * diff_w;
      den += ref * ref;
      max_diff = std::max(max_diff, std::abs(diff));
    }
  std::printf("sparse vs dense attention output on those queries: max |diff| %.2e, relative L2 error %.2e\n", max_diff,
              std::sqrt(num / den));
  std::printf("  (a sliding window of the same %lld-block budget misses the needles: relative L2 error %.2f)\n",
              (long long)topk, std::sqrt(num_w / den));

  // Cost model (forward): dense 4*h_q*d per visible (query, key) pair; MSA index branch
  // 2*h_kv*d_idx per visible pair, main branch 4*d per selected (query head, key) pair.
  double pairs = 0, selected = 0;
  for (int64_t i = 0; i < n; ++i) {
    pairs += double(i + 1);
    for (int64_t r = 0; r < h_kv; ++r)
      for (int64_t t = 0; t < topk; ++t) {
        int32_t b = topk_idx[(i * h_kv + r) * topk + t];
        if (b >= 0) selected += double(g) * double(std::min<int64_t>(bk, i + 1 - int64_t(b) * bk));
      }
  }
  double dense = 4.0 * h_q * d * pairs, index = 2.0 * h_kv * d_idx * pairs, main_branch = 4.0 * d * selected;
  std::printf(
      "attention FLOPs (forward, whole sequence): dense %.1f G; MSA %.1f G = index %.1f G + main %.1f G "
      "-> %.2fx fewer (main branch alone %.1fx)\n",
      dense * 1e-9, (index + main_branch) * 1e-9, index * 1e-9, main_branch * 1e-9, dense / (index + main_branch),
      dense / main_branch);
  std::printf("done in %.1f s\n", seconds_since(t_all));
  return found == int64_t(needles.size()) ? 0 : 1;
}

}  // namespace msa::cli
