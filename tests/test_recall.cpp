// Tests of msa::selection_recall on the CPU: a hand-computed case, the main branch's own top-k
// scoring 1, and per-row values against a dense reference written here on varlen and chunked
// inputs.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "test_util.h"

namespace msa::test {
namespace {

struct Problem {
  std::vector<int32_t> lens_q, lens_k;
  std::vector<int32_t> q_pos;  // empty: bottom-right aligned
  int64_t h_q = 4, h_kv = 2, d = 16, bk = 16, topk = 4;
  float scale = 0.f;
  DType dtype = DType::f32;
  std::vector<double> q, k;  // [n_q, h_q, d], [n_k, h_kv, d], exact in dtype
  std::vector<int32_t> sel;  // [n_q, h_kv, topk] selection to judge

  int64_t n_q() const { return std::accumulate(lens_q.begin(), lens_q.end(), int64_t(0)); }
  int64_t n_k() const { return std::accumulate(lens_k.begin(), lens_k.end(), int64_t(0)); }
};

struct Result {
  SelectionRecall mean;
  std::vector<float> block_rows, score_rows;
};

Result run(const Problem& pr, bool rows = true) {
  std::vector<int32_t> cu_q = cu_from_lengths(pr.lens_q), cu_k = cu_from_lengths(pr.lens_k);
  Buf q(pr.dtype, pr.q), k(pr.dtype, pr.k);
  SelectionRecallParams p;
  p.seq.n_q = pr.n_q();
  p.seq.n_k = pr.n_k();
  p.seq.batch = int64_t(pr.lens_q.size());
  p.seq.cu_seqlens_q = cu_q.data();
  p.seq.cu_seqlens_k = cu_k.data();
  p.seq.q_pos = pr.q_pos.empty() ? nullptr : pr.q_pos.data();
  p.h_q = pr.h_q;
  p.h_kv = pr.h_kv;
  p.d = pr.d;
  p.bk = pr.bk;
  p.topk = pr.topk;
  p.scale = pr.scale;
  p.dtype = pr.dtype;
  p.q = q.data();
  p.k = k.data();
  p.topk_idx = pr.sel.data();
  Result res;
  if (rows) {
    res.block_rows.assign(size_t(pr.n_q() * pr.h_kv), 12345.f);
    res.score_rows.assign(size_t(pr.n_q() * pr.h_kv), 12345.f);
    p.block_recall_rows = res.block_rows.data();
    p.score_recall_rows = res.score_rows.data();
  }
  res.mean = selection_recall(p);
  return res;
}

// Absolute position of each query row, from the lengths (or q_pos).
std::vector<int64_t> positions(const Problem& pr) {
  std::vector<int64_t> pos;
  for (size_t b = 0, row = 0; b < pr.lens_q.size(); ++b)
    for (int32_t t = 0; t < pr.lens_q[b]; ++t, ++row)
      pos.push_back(pr.q_pos.empty() ? pr.lens_k[b] - pr.lens_q[b] + t : pr.q_pos[row]);
  return pos;
}

// Dense reference: per row (i, r) the block masses P_b, the main branch's own top-k I* and the
// two recalls of the given selection.
struct Ref {
  std::vector<std::vector<double>> mass;   // [n_q * h_kv][n_vis]
  std::vector<std::vector<int32_t>> best;  // I*, ascending
  std::vector<double> block_rows, score_rows;
  double block_mean = 0, score_mean = 0;
  std::vector<int64_t> pos;
};

Ref reference(const Problem& pr) {
  Ref ref;
  const int64_t g = pr.h_q / pr.h_kv, d = pr.d, bk = pr.bk;
  const double scale = pr.scale != 0.f ? pr.scale : double(float(1.0 / std::sqrt(double(d))));
  ref.pos = positions(pr);
  int64_t row = 0, key0 = 0;
  for (size_t b = 0; b < pr.lens_q.size(); ++b) {
    for (int32_t t = 0; t < pr.lens_q[b]; ++t, ++row) {
      const int64_t pos = ref.pos[row];
      const int64_t n_vis = pos / bk + 1;
      for (int64_t r = 0; r < pr.h_kv; ++r) {
        std::vector<double> mass(n_vis, 0.0);
        for (int64_t h = r * g; h < (r + 1) * g; ++h) {
          std::vector<double> e(pos + 1);
          for (int64_t j = 0; j <= pos; ++j) {
            double acc = 0;
            for (int64_t c = 0; c < d; ++c)
              acc += pr.q[(row * pr.h_q + h) * d + c] * pr.k[((key0 + j) * pr.h_kv + r) * d + c];
            e[j] = acc * scale;
          }
          double mx = *std::max_element(e.begin(), e.end()), sum = 0;
          for (double& x : e) sum += (x = std::exp(x - mx));
          for (int64_t j = 0; j <= pos; ++j) mass[j / bk] += e[j] / sum / double(g);
        }
        // I*: the local block, then the heaviest others by float mass (lower block on ties).
        std::vector<int32_t> best = {int32_t(n_vis - 1)};
        std::vector<int32_t> others(n_vis - 1);
        std::iota(others.begin(), others.end(), 0);
        std::stable_sort(others.begin(), others.end(),
                         [&](int32_t a, int32_t c) { return float(mass[a]) > float(mass[c]); });
        for (int32_t o : others)
          if (int64_t(best.size()) < pr.topk) best.push_back(o);
        std::sort(best.begin(), best.end());

        const int32_t* sel = &pr.sel[(row * pr.h_kv + r) * pr.topk];
        double hit = 0, m_hit = 0, m_best = 0;
        for (int32_t bb : best) {
          m_best += mass[bb];
          if (std::find(sel, sel + pr.topk, bb) != sel + pr.topk) {
            hit += 1;
            m_hit += mass[bb];
          }
        }
        ref.block_rows.push_back(hit / double(best.size()));
        ref.score_rows.push_back(m_hit / m_best);
        ref.mass.push_back(mass);
        ref.best.push_back(best);
      }
    }
    key0 += pr.lens_k[b];
  }
  for (double x : ref.block_rows) ref.block_mean += x / double(ref.block_rows.size());
  for (double x : ref.score_rows) ref.score_mean += x / double(ref.score_rows.size());
  return ref;
}

Problem random_problem(uint64_t seed, std::vector<int32_t> lens_q, std::vector<int32_t> lens_k, int64_t h_q,
                       int64_t h_kv, int64_t d, int64_t bk, int64_t topk, DType dtype) {
  std::mt19937_64 rng(seed);
  Problem pr;
  pr.lens_q = std::move(lens_q);
  pr.lens_k = std::move(lens_k);
  pr.h_q = h_q;
  pr.h_kv = h_kv;
  pr.d = d;
  pr.bk = bk;
  pr.topk = topk;
  pr.dtype = dtype;
  // sigma 2 spreads the attention so that the block masses differ visibly.
  pr.q = randn(rng, size_t(pr.n_q() * h_q * d), 2.0, dtype);
  pr.k = randn(rng, size_t(pr.n_k() * h_kv * d), 1.0, dtype);
  return pr;
}

// A valid random selection per row: the own block plus up to topk - 1 random visible others, in
// random order, -1 padded.
void random_selection(Problem& pr, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> pos = positions(pr);
  pr.sel.assign(size_t(pr.n_q() * pr.h_kv * pr.topk), -1);
  for (int64_t i = 0; i < pr.n_q(); ++i)
    for (int64_t r = 0; r < pr.h_kv; ++r) {
      int32_t own = int32_t(pos[i] / pr.bk);
      std::vector<int32_t> blocks(own);
      std::iota(blocks.begin(), blocks.end(), 0);
      std::shuffle(blocks.begin(), blocks.end(), rng);
      int64_t n = std::uniform_int_distribution<int64_t>(0, std::min<int64_t>(pr.topk - 1, own))(rng);
      blocks.resize(size_t(n));
      blocks.push_back(own);
      std::shuffle(blocks.begin(), blocks.end(), rng);
      std::copy(blocks.begin(), blocks.end(), pr.sel.begin() + (i * pr.h_kv + r) * pr.topk);
    }
}

// The main branch's own top-k, in a shuffled order within each row.
void own_topk_selection(Problem& pr, uint64_t seed) {
  std::mt19937_64 rng(seed);
  pr.sel.assign(size_t(pr.n_q() * pr.h_kv * pr.topk), -1);
  Ref ref = reference(pr);
  for (size_t ir = 0; ir < ref.best.size(); ++ir) {
    std::vector<int32_t> best = ref.best[ir];
    std::shuffle(best.begin(), best.end(), rng);
    std::copy(best.begin(), best.end(), pr.sel.begin() + int64_t(ir) * pr.topk);
  }
}

std::vector<double> to_d(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

TEST(SelectionRecall, HandComputedOwnBlockOnly) {
  // One sequence of 4 tokens, bk = 1 (block = token), topk = 2, d = 1, scale = 1, one group of
  // two heads: q = 1 and q = 2 against keys k = (ln 4, 0, ln 2, 0). Unnormalised weights per
  // query position: head A 4, 1, 2, 1 and head B 16, 1, 4, 1 over the visible prefix.
  //   pos 0: one block, I* = {0}: recalls 1, 1.
  //   pos 1: P = ((0.8 + 16/17) / 2, (0.2 + 1/17) / 2); sees 2 <= topk blocks, I* = {0, 1}:
  //          block 1/2, score P_1 = 11/85.
  //   pos 2: P = (28/42, 4/42, 10/42); I* = {0, 2}: block 1/2, score 10 / 38 = 5/19.
  //   pos 3: P_0 = (4/8 + 16/22) / 2, P_3 = (1/8 + 1/22) / 2; I* = {0, 3}:
  //          block 1/2, score (15/88) / (123/88) = 5/41.
  Problem pr;
  pr.lens_q = pr.lens_k = {4};
  pr.h_q = 2;
  pr.h_kv = 1;
  pr.d = 1;
  pr.bk = 1;
  pr.topk = 2;
  pr.scale = 1.f;
  pr.dtype = DType::f64;
  pr.q = {1, 2, 1, 2, 1, 2, 1, 2};
  pr.k = {std::log(4.0), 0, std::log(2.0), 0};
  pr.sel = {0, -1, 1, -1, 2, -1, 3, -1};
  Result res = run(pr);
  std::vector<double> block = {1, 0.5, 0.5, 0.5}, score = {1, 11.0 / 85, 5.0 / 19, 5.0 / 41};
  EXPECT_TRUE(allclose(to_d(res.block_rows), block, 0, 1e-7, "block_recall_rows"));
  EXPECT_TRUE(allclose(to_d(res.score_rows), score, 0, 1e-7, "score_recall_rows"));
  EXPECT_NEAR(res.mean.block_recall, 0.625, 1e-12);
  EXPECT_NEAR(res.mean.score_recall, (1 + 11.0 / 85 + 5.0 / 19 + 5.0 / 41) / 4, 1e-12);

  // The same rows with I* itself, in either order: all 1.
  pr.sel = {0, -1, 1, 0, 2, 0, 0, 3};
  res = run(pr);
  EXPECT_EQ(res.mean.block_recall, 1.0);
  EXPECT_EQ(res.mean.score_recall, 1.0);
  // A wrong second block at pos 3 counts like the own block alone.
  pr.sel = {0, -1, 0, 1, 2, 0, 3, 1};
  res = run(pr);
  EXPECT_TRUE(allclose(to_d(res.score_rows), {1, 1, 1, 5.0 / 41}, 0, 1e-7, "score_recall_rows"));
  EXPECT_TRUE(allclose(to_d(res.block_rows), {1, 1, 1, 0.5}, 0, 1e-7, "block_recall_rows"));
}

TEST(SelectionRecall, OwnTopkScoresOne) {
  uint64_t seed = 10;
  for (DType t : {DType::f32, DType::bf16})
    for (int64_t topk : {1, 3, 16}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(t) << " topk " << topk);
      Problem pr = random_problem(seed++, {1, 300, 40, 129}, {1, 300, 200, 129}, 4, 2, 16, 16, topk, t);
      own_topk_selection(pr, seed++);
      Result res = run(pr);
      EXPECT_EQ(res.mean.block_recall, 1.0);
      EXPECT_EQ(res.mean.score_recall, 1.0);
      for (size_t ir = 0; ir < res.block_rows.size(); ++ir) {
        ASSERT_EQ(res.block_rows[ir], 1.f) << "row " << ir;
        ASSERT_EQ(res.score_rows[ir], 1.f) << "row " << ir;
      }
    }
}

TEST(SelectionRecall, RandomSelectionsMatchReference) {
  struct Shape {
    std::vector<int32_t> lens_q, lens_k;
    int64_t h_q, h_kv, d, bk, topk;
    DType dtype;
    bool explicit_pos;
  };
  std::vector<Shape> shapes = {
      {{1, 257, 3, 130}, {1, 257, 3, 130}, 2, 2, 16, 16, 4, DType::f32, false},  // g = 1
      {{20, 64}, {600, 64}, 8, 2, 32, 32, 5, DType::bf16, false},                // g = 4, chunked
      {{33}, {500}, 4, 1, 16, 16, 8, DType::f64, true},                          // g = 4, explicit positions
      {{1, 1}, {129, 4097}, 16, 1, 16, 128, 16, DType::f32, false},              // g = 16, decode
  };
  uint64_t seed = 100;
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << "g " << sh.h_q / sh.h_kv << " bk " << sh.bk << " topk " << sh.topk << " "
                                      << dtype_name(sh.dtype));
    Problem pr = random_problem(seed++, sh.lens_q, sh.lens_k, sh.h_q, sh.h_kv, sh.d, sh.bk, sh.topk, sh.dtype);
    if (sh.explicit_pos) {
      std::mt19937_64 rng(seed++);
      for (int32_t t = 0; t < sh.lens_q[0]; ++t)
        pr.q_pos.push_back(std::uniform_int_distribution<int32_t>(0, sh.lens_k[0] - 1)(rng));
    }
    random_selection(pr, seed++);
    Ref ref = reference(pr);
    Result res = run(pr);
    // Per-row values are stored as float: one rounding of a double result.
    EXPECT_TRUE(allclose(to_d(res.block_rows), ref.block_rows, 0, 1e-7, "block_recall_rows"));
    EXPECT_TRUE(allclose(to_d(res.score_rows), ref.score_rows, 1e-12, 1e-6, "score_recall_rows"));
    EXPECT_NEAR(res.mean.block_recall, ref.block_mean, 1e-12);
    EXPECT_NEAR(res.mean.score_recall, ref.score_mean, 1e-12);

    // Values in [0, 1]; the means are the means of the rows; the rows do not change the means.
    double block_sum = 0, score_sum = 0;
    for (size_t ir = 0; ir < res.block_rows.size(); ++ir) {
      EXPECT_TRUE(res.block_rows[ir] >= 0.f && res.block_rows[ir] <= 1.f) << "row " << ir;
      EXPECT_TRUE(res.score_rows[ir] >= 0.f && res.score_rows[ir] <= 1.f) << "row " << ir;
      block_sum += res.block_rows[ir];
      score_sum += res.score_rows[ir];
    }
    EXPECT_NEAR(block_sum / double(res.block_rows.size()), res.mean.block_recall, 1e-6);
    EXPECT_NEAR(score_sum / double(res.score_rows.size()), res.mean.score_recall, 1e-6);
    EXPECT_GE(res.mean.block_recall, 0.0);
    EXPECT_LE(res.mean.block_recall, 1.0);
    EXPECT_LT(res.mean.block_recall, 1.0) << "the random selection should miss some blocks";
    Result bare = run(pr, false);
    EXPECT_EQ(bare.mean.block_recall, res.mean.block_recall);
    EXPECT_EQ(bare.mean.score_recall, res.mean.score_recall);
  }
}

}  // namespace
}  // namespace msa::test
