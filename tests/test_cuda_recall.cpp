// Tests of msa::selection_recall on the CUDA backend against the CPU backend: per-row block and
// score recall and their means, on one sequence, varlen batches with empty and one-token
// sequences, and chunks with explicit positions; odd lengths; g 1 to 16, d 64 and 128, bk 16, 64
// and 128, topk 1 to 32; selections random, the oracle itself, or the own block alone; k with
// padded, misaligned heads. The CUDA masses are float32 and the CPU's float64, so a row whose
// oracle is decided by a near tie of block masses (computed here in float64) is checked for range
// only, and the means may differ by such rows. Also: argument errors, zero queries, bitwise
// repeats. GPU tests skip with a message when no device is visible.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

namespace msa::test {
namespace {

TEST(CudaRecall, BadArgumentsThrowBeforeLaunch) {
  REQUIRE_CUDA_BUILD();
  SelectionRecallParams p;
  p.seq.n_q = p.seq.n_k = 4;
  p.h_q = 4;
  p.h_kv = 1;
  p.d = 96;
  p.bk = 64;
  p.topk = 4;
  Exec ex;
  ex.backend = Backend::cuda;
  EXPECT_TRUE(throws_error([&] { selection_recall(p, ex); }, {"msa::selection_recall", "d = 96"}));
  p.d = 64;
  p.h_q = 3;
  EXPECT_TRUE(throws_error([&] { selection_recall(p, ex); }, {"h_q / h_kv = 3"}));
  p.h_q = 4;
  p.dtype = DType::f32;
  EXPECT_TRUE(throws_error([&] { selection_recall(p, ex); }, {"bfloat16"}));
  p.dtype = DType::bf16;  // null q with queries to judge
  EXPECT_TRUE(throws_error([&] { selection_recall(p, ex); }, {"q"}));
}

TEST(CudaRecall, ZeroQueriesGiveOne) {
  REQUIRE_CUDA_BUILD();
  SelectionRecallParams p;
  p.seq.n_q = 0;
  p.seq.n_k = 0;
  p.h_q = 4;
  p.h_kv = 1;
  p.d = 64;
  Exec ex;
  ex.backend = Backend::cuda;
  const SelectionRecall r = selection_recall(p, ex);
  EXPECT_EQ(r.block_recall, 1.0);
  EXPECT_EQ(r.score_recall, 1.0);
}

#ifdef MSA_WITH_CUDA

enum class Sel { random, oracle, own_only };

struct Problem {
  std::vector<int32_t> cu_q, cu_k, q_pos;  // q_pos empty: bottom-right aligned
  int64_t h_q, h_kv, d, bk, topk, pad_k = 0;
  std::vector<double> q, k;  // bf16-rounded values; k rows [n_k, h_kv, d + pad_k] (padding NaN)
  std::vector<int32_t> sel;
  std::vector<int64_t> pos;               // per query
  std::vector<std::vector<double>> mass;  // per (query, group): float64 P_b
  int64_t n_q() const { return cu_q.back(); }
  int64_t n_k() const { return cu_k.back(); }
  int64_t stride_k_head() const { return d + pad_k; }
};

// The float64 block masses of every row, as the contract defines them.
void masses(Problem& P) {
  const int64_t g = P.h_q / P.h_kv;
  const double scale = double(float(1.0 / std::sqrt(double(P.d))));
  P.mass.assign(size_t(P.n_q() * P.h_kv), {});
  for (size_t b = 0; b + 1 < P.cu_q.size(); ++b)
    for (int64_t i = P.cu_q[b]; i < P.cu_q[b + 1]; ++i) {
      const int64_t pos = P.pos[i];
      for (int64_t r = 0; r < P.h_kv; ++r) {
        std::vector<double> prob(pos + 1, 0.0), s(pos + 1);
        for (int64_t h = r * g; h < (r + 1) * g; ++h) {
          double mx = -INFINITY;
          for (int64_t j = 0; j <= pos; ++j) {
            double acc = 0;
            const double* kr = &P.k[size_t(((P.cu_k[b] + j) * P.h_kv + r) * P.stride_k_head())];
            for (int64_t c = 0; c < P.d; ++c) acc += P.q[size_t((i * P.h_q + h) * P.d + c)] * kr[c];
            s[j] = acc * scale;
            mx = std::max(mx, s[j]);
          }
          double sum = 0;
          for (int64_t j = 0; j <= pos; ++j) sum += std::exp(s[j] - mx);
          for (int64_t j = 0; j <= pos; ++j) prob[j] += std::exp(s[j] - mx) / sum / double(g);
        }
        std::vector<double>& m = P.mass[size_t(i * P.h_kv + r)];
        m.assign(size_t(pos / P.bk + 1), 0.0);
        for (int64_t j = 0; j <= pos; ++j) m[size_t(j / P.bk)] += prob[j];
      }
    }
}

// I* of a row from float64 masses (own block forced, then the heaviest, lower block on ties);
// decided = false when the cut falls between masses within 1e-4 of the largest (the float32
// masses of the CUDA path are good to a few 1e-6).
std::vector<int32_t> oracle(const std::vector<double>& m, int64_t topk, bool* decided) {
  const int32_t n = int32_t(m.size()), own = n - 1;
  std::vector<int32_t> others(size_t(std::max(0, n - 1)));
  std::iota(others.begin(), others.end(), 0);
  std::stable_sort(others.begin(), others.end(), [&](int32_t a, int32_t b) { return m[a] > m[b]; });
  const size_t keep = size_t(std::min<int64_t>(topk - 1, int64_t(others.size())));
  *decided = true;
  if (keep < others.size() && keep > 0) {
    const double top = m[others[0]];
    *decided = m[others[keep - 1]] - m[others[keep]] > 1e-4 * top + 1e-12;
  }
  std::vector<int32_t> out(others.begin(), others.begin() + keep);
  out.push_back(own);
  std::sort(out.begin(), out.end());
  return out;
}

Problem make_problem(uint64_t seed, const std::vector<int32_t>& lens_q, const std::vector<int32_t>& lens_k,
                     bool explicit_pos, int64_t h_q, int64_t h_kv, int64_t d, int64_t bk, int64_t topk, Sel mode,
                     int64_t pad_k = 0) {
  std::mt19937_64 rng(seed);
  Problem P{cu_from_lengths(lens_q), cu_from_lengths(lens_k), {}, h_q, h_kv, d, bk, topk, pad_k, {}, {}, {}, {}, {}};
  const int64_t n_q = P.n_q(), n_k = P.n_k();
  P.pos.resize(size_t(n_q));
  for (size_t b = 0; b + 1 < P.cu_q.size(); ++b) {
    const int64_t lq = P.cu_q[b + 1] - P.cu_q[b], lk = P.cu_k[b + 1] - P.cu_k[b];
    for (int64_t t = 0; t < lq; ++t)
      P.pos[size_t(P.cu_q[b] + t)] = explicit_pos ? int64_t(rng() % uint64_t(lk)) : lk - lq + t;
  }
  if (explicit_pos) P.q_pos.assign(P.pos.begin(), P.pos.end());
  P.q = randn(rng, size_t(n_q * h_q * d), 1.5, DType::bf16);
  const std::vector<double> kk = randn(rng, size_t(n_k * h_kv * d), 1.0, DType::bf16);
  P.k.assign(size_t(n_k * h_kv * P.stride_k_head()), std::nan(""));
  for (int64_t x = 0; x < n_k * h_kv; ++x)
    for (int64_t c = 0; c < d; ++c) P.k[size_t(x * P.stride_k_head() + c)] = kk[size_t(x * d + c)];
  masses(P);
  P.sel.assign(size_t(n_q * h_kv * topk), -1);
  for (int64_t row = 0; row < n_q * h_kv; ++row) {
    const std::vector<double>& m = P.mass[size_t(row)];
    const int32_t n = int32_t(m.size());
    std::vector<int32_t> s;
    if (mode == Sel::oracle) {
      bool decided;
      s = oracle(m, topk, &decided);
    } else {
      s = {n - 1};
      if (mode == Sel::random) {
        std::vector<int32_t> cand(size_t(n - 1));
        std::iota(cand.begin(), cand.end(), 0);
        std::shuffle(cand.begin(), cand.end(), rng);
        const int64_t c = int64_t(rng() % uint64_t(std::min<int64_t>(topk - 1, n - 1) + 1));
        s.insert(s.end(), cand.begin(), cand.begin() + c);
      }
      std::sort(s.begin(), s.end());
    }
    std::copy(s.begin(), s.end(), P.sel.begin() + row * topk);
  }
  return P;
}

struct Result {
  SelectionRecall mean;
  std::vector<float> block, score;
};

Result run(const Problem& P, Backend backend) {
  const int64_t n_q = P.n_q(), rows = n_q * P.h_kv;
  Buf qb(DType::bf16, P.q), kb(DType::bf16, P.k);
  Result res;
  res.block.assign(size_t(rows), std::nanf(""));
  res.score.assign(size_t(rows), std::nanf(""));
  SelectionRecallParams p;
  p.seq.n_q = n_q;
  p.seq.n_k = P.n_k();
  p.seq.batch = int64_t(P.cu_q.size()) - 1;
  p.h_q = P.h_q;
  p.h_kv = P.h_kv;
  p.d = P.d;
  p.bk = P.bk;
  p.topk = P.topk;
  p.dtype = DType::bf16;
  p.stride_k_tok = P.h_kv * P.stride_k_head();
  p.stride_k_head = P.stride_k_head();
  Exec ex;
  ex.backend = backend;
  if (backend == Backend::cpu) {
    p.seq.cu_seqlens_q = P.cu_q.data();
    p.seq.cu_seqlens_k = P.cu_k.data();
    p.seq.q_pos = P.q_pos.empty() ? nullptr : P.q_pos.data();
    p.q = qb.data();
    p.k = kb.data();
    p.topk_idx = P.sel.data();
    p.block_recall_rows = res.block.data();
    p.score_recall_rows = res.score.data();
    res.mean = selection_recall(p, ex);
    return res;
  }
  DevBuf<int32_t> cu_q(P.cu_q), cu_k(P.cu_k), q_pos(P.q_pos), sel(P.sel);
  DevBuf<uint8_t> q(qb.bytes), k(kb.bytes);
  DevBuf<float> block(res.block), score(res.score);
  p.seq.cu_seqlens_q = cu_q.ptr;
  p.seq.cu_seqlens_k = cu_k.ptr;
  p.seq.q_pos = P.q_pos.empty() ? nullptr : q_pos.ptr;
  p.q = q.ptr;
  p.k = k.ptr;
  p.topk_idx = sel.ptr;
  p.block_recall_rows = block.ptr;
  p.score_recall_rows = score.ptr;
  res.mean = selection_recall(p, ex);
  res.block = block.get();
  res.score = score.get();
  return res;
}

// CUDA against CPU: rows decided by no near tie must agree (block recall exactly, score recall to
// float rounding of the masses); the others must lie in [0, 1]; the means differ at most by the
// undecided rows' share.
void expect_matches_cpu(const Problem& P, const std::string& what) {
  SCOPED_TRACE(what);
  const Result got = run(P, Backend::cuda), ref = run(P, Backend::cpu);
  const int64_t rows = P.n_q() * P.h_kv;
  int64_t undecided = 0, compared = 0;
  for (int64_t row = 0; row < rows; ++row) {
    bool decided;
    oracle(P.mass[size_t(row)], P.topk, &decided);
    const float gb = got.block[size_t(row)], gs = got.score[size_t(row)];
    ASSERT_TRUE(gb >= 0.f && gb <= 1.f && gs >= 0.f && gs <= 1.f)
        << "row " << row << ": block " << gb << ", score " << gs << " outside [0, 1]";
    if (!decided) {
      ++undecided;
      continue;
    }
    ++compared;
    ASSERT_EQ(gb, ref.block[size_t(row)]) << "block recall of row " << row;
    ASSERT_NEAR(gs, ref.score[size_t(row)], 1e-4) << "score recall of row " << row;
  }
  EXPECT_GT(compared, rows / 2) << "too few rows decided without a near tie";
  const double slack = double(undecided) / double(rows) + 1e-5;
  EXPECT_NEAR(got.mean.block_recall, ref.mean.block_recall, slack);
  EXPECT_NEAR(got.mean.score_recall, ref.mean.score_recall, slack + 1e-4);
}

TEST(CudaRecall, OneSequenceRandomSelections) {
  REQUIRE_GPU();
  expect_matches_cpu(make_problem(1, {300}, {300}, false, 8, 2, 64, 64, 4, Sel::random), "len 300, g 4, d 64");
  expect_matches_cpu(make_problem(2, {129}, {129}, false, 2, 2, 128, 16, 32, Sel::random), "len 129, g 1, bk 16");
}

TEST(CudaRecall, VarlenBatchWithEmptyAndOneTokenSequences) {
  REQUIRE_GPU();
  expect_matches_cpu(make_problem(3, {129, 0, 513, 1}, {129, 0, 513, 1}, false, 16, 1, 128, 128, 16, Sel::random),
                     "g 16, d 128, bk 128, topk 16");
  expect_matches_cpu(make_problem(4, {127, 1, 200}, {127, 1, 200}, false, 4, 2, 64, 16, 1, Sel::random),
                     "topk 1: the own block alone");
}

TEST(CudaRecall, ChunksWithExplicitPositionsAndMisalignedKeys) {
  REQUIRE_GPU();
  // Keys with 3 elements of padding between heads: unaligned rows, the scalar load path.
  expect_matches_cpu(make_problem(5, {7, 5}, {700, 300}, true, 4, 4, 64, 16, 32, Sel::random, 3),
                     "q_pos, g 1, padded k");
  expect_matches_cpu(make_problem(6, {9, 3}, {1023, 97}, true, 16, 2, 128, 64, 3, Sel::random),
                     "q_pos, g 8, bk 64, topk 3");
}

TEST(CudaRecall, OracleAndOwnBlockSelections) {
  REQUIRE_GPU();
  // The oracle scores 1 on every decided row; the own block alone scores low where others count.
  const Problem P = make_problem(7, {400}, {400}, false, 8, 1, 64, 64, 4, Sel::oracle);
  expect_matches_cpu(P, "oracle selection");
  const Result got = run(P, Backend::cuda);
  int64_t ones = 0;
  for (float x : got.block) ones += x == 1.f ? 1 : 0;
  EXPECT_GT(ones, int64_t(got.block.size()) * 9 / 10);
  expect_matches_cpu(make_problem(8, {400}, {400}, false, 8, 1, 64, 64, 4, Sel::own_only), "own block only");
}

TEST(CudaRecall, RepeatsAreBitwiseIdentical) {
  REQUIRE_GPU();
  const Problem P = make_problem(9, {300, 77}, {300, 77}, false, 16, 4, 128, 64, 8, Sel::random);
  const Result a = run(P, Backend::cuda);
  for (int rep = 0; rep < 5; ++rep) {
    const Result b = run(P, Backend::cuda);
    EXPECT_TRUE(bitwise_equal(a.block, b.block));
    EXPECT_TRUE(bitwise_equal(a.score, b.score));
    EXPECT_EQ(a.mean.block_recall, b.mean.block_recall);
    EXPECT_EQ(a.mean.score_recall, b.mean.score_recall);
  }
}

#endif  // MSA_WITH_CUDA

}  // namespace
}  // namespace msa::test
