// Tests of msa::block_topk on the CPU: top-k over given block scores against a selection by
// repeated argmax written here, with ties, NaN, -inf, short rows, strided rows and both modes of
// force_last.
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "test_util.h"

namespace msa::test {
namespace {

constexpr int32_t kPoison = -777;
const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

// a beats b: numbers above NaN, then larger, then lower column.
bool beats(float va, int32_t a, float vb, int32_t b) {
  if (std::isnan(va) || std::isnan(vb)) return std::isnan(vb) && (!std::isnan(va) || a < b);
  return va > vb || (va == vb && a < b);
}

// The expected row by repeated argmax over the columns not taken yet.
std::vector<int32_t> expected_row(const float* m, int64_t n_vis, int64_t topk, bool force_last) {
  std::vector<int32_t> sel;
  std::vector<bool> taken(size_t(n_vis), false);
  if (n_vis <= topk) {
    for (int32_t b = 0; b < n_vis; ++b) sel.push_back(b);
  } else {
    if (force_last) {
      sel.push_back(int32_t(n_vis - 1));
      taken[n_vis - 1] = true;
    }
    while (int64_t(sel.size()) < topk) {
      int32_t best = -1;
      for (int32_t b = 0; b < n_vis; ++b)
        if (!taken[b] && (best < 0 || beats(m[b], b, m[best], best))) best = b;
      sel.push_back(best);
      taken[best] = true;
    }
    std::sort(sel.begin(), sel.end());
  }
  sel.resize(size_t(topk), -1);
  return sel;
}

struct Case {
  int64_t rows = 0, n_blocks = 0, topk = 16, stride_row = 0;
  bool force_last = true;
  std::vector<float> scores;        // [rows, stride_row or n_blocks]
  std::vector<int32_t> row_blocks;  // empty: all n_blocks
};

std::vector<int32_t> run(const Case& c, int num_threads = 0) {
  BlockTopkParams p;
  p.rows = c.rows;
  p.n_blocks = c.n_blocks;
  p.topk = c.topk;
  p.force_last = c.force_last;
  p.scores = c.scores.data();
  p.stride_row = c.stride_row;
  p.row_blocks = c.row_blocks.empty() ? nullptr : c.row_blocks.data();
  std::vector<int32_t> out(size_t(c.rows * c.topk), kPoison);
  p.topk_idx = out.data();
  Exec ex;
  ex.num_threads = num_threads;
  block_topk(p, ex);
  return out;
}

// Every row equal to the expected one (ascending with -1 tail is part of the contract, so this
// also compares the sets); reports the first few differing rows.
::testing::AssertionResult check(const Case& c) {
  std::vector<int32_t> got = run(c);
  const int64_t stride = c.stride_row ? c.stride_row : c.n_blocks;
  int64_t bad = 0;
  std::ostringstream os;
  for (int64_t i = 0; i < c.rows; ++i) {
    int64_t n_vis = c.row_blocks.empty() ? c.n_blocks : c.row_blocks[i];
    std::vector<int32_t> want = expected_row(c.scores.data() + i * stride, n_vis, c.topk, c.force_last);
    std::vector<int32_t> row(got.begin() + i * c.topk, got.begin() + (i + 1) * c.topk);
    if (row != want && bad++ < 5) {
      os << "\n  row " << i << " (n_vis " << n_vis << "): got [";
      for (int32_t b : row) os << " " << b;
      os << " ] expected [";
      for (int32_t b : want) os << " " << b;
      os << " ]";
    }
  }
  if (bad) return ::testing::AssertionFailure() << bad << " rows differ" << os.str();
  return ::testing::AssertionSuccess();
}

Case random_case(uint64_t seed, int64_t rows, int64_t n_blocks, int64_t topk, bool force_last) {
  std::mt19937_64 rng(seed);
  Case c;
  c.rows = rows;
  c.n_blocks = n_blocks;
  c.topk = topk;
  c.force_last = force_last;
  std::vector<double> v = randn(rng, size_t(rows * n_blocks), 1.0, DType::f32);
  c.scores.assign(v.begin(), v.end());
  return c;
}

TEST(BlockTopk, RandomRows) {
  uint64_t seed = 1;
  for (bool force_last : {true, false})
    for (int64_t topk : {1, 2, 7, 16, 32})
      for (int64_t n_blocks : {1, 16, 33, 200}) {
        SCOPED_TRACE(::testing::Message()
                     << "force_last " << force_last << " topk " << topk << " n_blocks " << n_blocks);
        EXPECT_TRUE(check(random_case(seed++, 64, n_blocks, topk, force_last)));
      }
}

TEST(BlockTopk, TiesGoToLowerBlock) {
  // All equal: the lowest blocks win (plus the last one when forced).
  for (bool force_last : {true, false}) {
    Case c;
    c.rows = 3;
    c.n_blocks = 10;
    c.topk = 4;
    c.force_last = force_last;
    c.scores.assign(30, 0.5f);
    std::vector<int32_t> got = run(c);
    std::vector<int32_t> want = force_last ? std::vector<int32_t>{0, 1, 2, 9} : std::vector<int32_t>{0, 1, 2, 3};
    for (int64_t i = 0; i < c.rows; ++i)
      EXPECT_EQ(std::vector<int32_t>(got.begin() + i * 4, got.begin() + (i + 1) * 4), want) << "row " << i;
  }
  // A tie straddling the boundary: scores 3, 1, 2, 2, 2, 0 with topk 3 keep {0, 2, 3}.
  Case c;
  c.rows = 1;
  c.n_blocks = 6;
  c.topk = 3;
  c.force_last = false;
  c.scores = {3, 1, 2, 2, 2, 0};
  EXPECT_EQ(run(c), (std::vector<int32_t>{0, 2, 3}));
  // Values from a set of three: ties at every rank of every row.
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<int> pick(0, 2);
  for (bool force_last : {true, false}) {
    Case r = random_case(12, 200, 40, 6, force_last);
    for (float& x : r.scores) x = float(pick(rng));
    EXPECT_TRUE(check(r)) << "force_last " << force_last;
  }
}

TEST(BlockTopk, NaNAndInfinities) {
  // NaN ranks below -inf; -inf ties among themselves toward the lower block; +inf is a number.
  Case c;
  c.rows = 1;
  c.n_blocks = 5;
  c.force_last = false;
  c.scores = {kNaN, -kInf, kNaN, -kInf, 5.f};
  c.topk = 2;
  EXPECT_EQ(run(c), (std::vector<int32_t>{1, 4}));
  c.topk = 4;
  EXPECT_EQ(run(c), (std::vector<int32_t>{0, 1, 3, 4}));
  c.topk = 3;
  c.force_last = true;
  c.scores = {kNaN, -kInf, kNaN, kInf, kNaN};  // the NaN last block is kept because it is local
  EXPECT_EQ(run(c), (std::vector<int32_t>{1, 3, 4}));
  c.scores = {kNaN, kNaN, kNaN, kNaN, kNaN};
  EXPECT_EQ(run(c), (std::vector<int32_t>{0, 1, 4}));

  // Random rows sprinkled with NaN, -inf and +inf.
  std::mt19937_64 rng(21);
  std::uniform_int_distribution<int> pick(0, 9);
  for (bool force_last : {true, false})
    for (int64_t topk : {1, 5, 32}) {
      Case r = random_case(22 + topk, 100, 50, topk, force_last);
      for (float& x : r.scores) {
        int u = pick(rng);
        if (u == 0) x = kNaN;
        if (u == 1) x = -kInf;
        if (u == 2) x = kInf;
      }
      EXPECT_TRUE(check(r)) << "force_last " << force_last << " topk " << topk;
    }
}

TEST(BlockTopk, ShortRows) {
  // row_blocks below n_blocks: the columns past it hold the largest values and must be ignored;
  // the local block is the last visible column, not the last column.
  for (bool force_last : {true, false})
    for (int64_t topk : {1, 4, 32}) {
      Case c = random_case(31 + topk, 120, 60, topk, force_last);
      std::mt19937_64 rng(32 + topk);
      std::uniform_int_distribution<int32_t> len(0, 60);
      for (int64_t i = 0; i < c.rows; ++i) {
        int32_t n = i < 3 ? int32_t(i) : i == 3 ? 60 : i == 4 ? int32_t(topk) : len(rng);
        c.row_blocks.push_back(n);
        for (int64_t b = n; b < c.n_blocks; ++b) c.scores[i * c.n_blocks + b] = 1e30f;
      }
      EXPECT_TRUE(check(c)) << "force_last " << force_last << " topk " << topk;
      // A row with no visible column selects nothing.
      std::vector<int32_t> got = run(c);
      EXPECT_TRUE(std::all_of(got.begin(), got.begin() + topk, [](int32_t b) { return b == -1; }));
    }
}

TEST(BlockTopk, RowsSeeingAtMostTopkKeepAll) {
  for (bool force_last : {true, false}) {
    Case c = random_case(41, 8, 32, 32, force_last);
    std::vector<int32_t> got = run(c);
    for (int64_t i = 0; i < c.rows; ++i)
      for (int32_t t = 0; t < 32; ++t) ASSERT_EQ(got[i * 32 + t], t);
    c.row_blocks = {0, 1, 5, 31, 32, 17, 2, 32};
    EXPECT_TRUE(check(c));
  }
}

TEST(BlockTopk, StridedRows) {
  // Row stride past n_blocks; the gaps hold values that would win if read.
  const int64_t rows = 50, n_blocks = 37, stride = 45;
  Case c = random_case(51, rows, stride, 8, true);
  c.n_blocks = n_blocks;
  c.stride_row = stride;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t b = n_blocks; b < stride; ++b) c.scores[i * stride + b] = 1e30f;
  EXPECT_TRUE(check(c));
  Case contiguous = c;
  contiguous.stride_row = 0;
  contiguous.scores.clear();
  for (int64_t i = 0; i < rows; ++i)
    contiguous.scores.insert(contiguous.scores.end(), c.scores.begin() + i * stride,
                             c.scores.begin() + i * stride + n_blocks);
  EXPECT_EQ(run(c), run(contiguous));
}

TEST(BlockTopk, ThreadCountDoesNotMatter) {
  Case c = random_case(61, 500, 100, 16, true);
  EXPECT_EQ(run(c, 1), run(c, 2));
}

}  // namespace
}  // namespace msa::test
