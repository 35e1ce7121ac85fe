// Tests of the main-branch forward on the CPU (sparse and dense attention): against independent
// naive formulas, sparse == dense when every visible block is selected, varlen batches, chunked
// queries, the order of a row's selected blocks, thread count and non-contiguous strides.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "attention_case.h"
#include "test_util.h"

namespace msa::test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

using Problem = AttentionCase;

// Self-attention problem over sequences of the given lengths (queries = keys).
Problem make_problem(uint64_t seed, const std::vector<int32_t>& lens, int64_t h_q, int64_t h_kv, int64_t d, DType t) {
  std::mt19937_64 rng(seed);
  Problem P;
  P.h_q = h_q;
  P.h_kv = h_kv;
  P.d = d;
  P.dtype = t;
  P.cu_q = P.cu_k = cu_from_lengths(lens);
  // q a little larger than k so that some rows have peaked softmaxes.
  P.q = randn(rng, P.n_q() * h_q * d, 1.5, t);
  P.k = randn(rng, P.n_k() * h_kv * d, 1.0, t);
  P.v = randn(rng, P.n_k() * h_kv * d, 1.0, t);
  return P;
}

// Every visible block of every row, ascending, -1 padded to topk.
void select_all(Problem& P, int64_t topk) {
  P.topk = topk;
  P.idx.assign(P.n_q() * P.h_kv * topk, -1);
  for (int64_t i = 0; i < P.n_q(); ++i)
    for (int64_t r = 0; r < P.h_kv; ++r)
      for (int64_t b = 0; b <= P.pos(i) / P.bk; ++b) P.idx[(i * P.h_kv + r) * topk + b] = int32_t(b);
}

// Random subsets of the visible blocks (with or without the local block, possibly empty), valid
// entries in random order then -1 padding. Block `every` is in every row that can see it; block
// `none` is in no row.
void select_random(Problem& P, int64_t topk, uint64_t seed, int32_t every = -1, int32_t none = -1) {
  std::mt19937_64 rng(seed);
  P.topk = topk;
  P.idx.assign(P.n_q() * P.h_kv * topk, -1);
  for (int64_t i = 0; i < P.n_q(); ++i) {
    int32_t own = int32_t(P.pos(i) / P.bk);
    for (int64_t r = 0; r < P.h_kv; ++r) {
      std::vector<int32_t> row, cand;
      if (every >= 0 && every <= own) row.push_back(every);
      for (int32_t b = 0; b <= own; ++b)
        if (b != every && b != none) cand.push_back(b);
      std::shuffle(cand.begin(), cand.end(), rng);
      int64_t room = std::min<int64_t>(topk - int64_t(row.size()), int64_t(cand.size()));
      int64_t c = std::uniform_int_distribution<int64_t>(0, room)(rng);
      row.insert(row.end(), cand.begin(), cand.begin() + c);
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), P.idx.begin() + (i * P.h_kv + r) * topk);
    }
  }
}

struct Result {
  std::vector<double> o, lse;
};

// The library's forward on contiguous buffers; outputs start poisoned so unwritten entries show.
Result run(const Problem& P, int num_threads = 0) {
  Buf q(P.dtype, P.q), k(P.dtype, P.k), v(P.dtype, P.v), o(P.dtype, P.n_q() * P.h_q * P.d);
  o.poison();
  std::vector<float> lse(P.n_q() * P.h_q, std::nanf(""));
  AttentionParams a = case_params(P);
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.o = o.data();
  a.lse = lse.data();
  case_forward(P, a, num_threads);
  return {o.to_double(), std::vector<double>(lse.begin(), lse.end())};
}

// Independent reference: for each (i, h), the full row of scores over the keys of the sequence,
// masked to the support (causal, and for sparse the listed blocks), then a softmax. An empty
// support gives o = 0, lse = -inf (the documented convention).
Result naive(const Problem& P) {
  const int64_t d = P.d, g = P.g();
  Result R;
  R.o.assign(P.n_q() * P.h_q * d, 0.0);
  R.lse.assign(P.n_q() * P.h_q, -kInf);
  for (int64_t i = 0; i < P.n_q(); ++i) {
    const int64_t b = P.seq(i), p = P.pos(i), len = P.len_k(b), k0 = P.cu_k[b];
    for (int64_t h = 0; h < P.h_q; ++h) {
      const int64_t r = h / g;
      std::vector<double> s(len, -kInf);
      for (int64_t j = 0; j < len; ++j) {
        bool in = j <= p;
        if (in && P.topk > 0) {
          const int32_t* row = &P.idx[(i * P.h_kv + r) * P.topk];
          in = std::find(row, row + P.topk, int32_t(j / P.bk)) != row + P.topk;
        }
        if (!in) continue;
        double x = 0;
        for (int64_t c = 0; c < d; ++c) x += P.q[(i * P.h_q + h) * d + c] * P.k[((k0 + j) * P.h_kv + r) * d + c];
        s[j] = x * P.scale();
      }
      double m = *std::max_element(s.begin(), s.end());
      if (m == -kInf) continue;
      double z = 0;
      for (double x : s) z += std::exp(x - m);
      double lse = m + std::log(z);
      R.lse[i * P.h_q + h] = lse;
      for (int64_t j = 0; j < len; ++j) {
        if (s[j] == -kInf) continue;
        double w = std::exp(s[j] - lse);
        for (int64_t c = 0; c < d; ++c) R.o[(i * P.h_q + h) * d + c] += w * P.v[((k0 + j) * P.h_kv + r) * d + c];
      }
    }
  }
  return R;
}

// Unit roundoff of a storage type: the library computes in double and rounds o once.
double unit_roundoff(DType t) {
  switch (t) {
    case DType::f64:
      return 0x1p-53;
    case DType::f32:
      return 0x1p-24;
    case DType::bf16:
      return 0x1p-8;  // 8 significant bits
  }
  return 0;
}

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m;
}

// Library against the naive reference. o: one rounding to dtype (relative) plus double
// summation error over at most a few thousand terms of size <= max|v| (absolute, 1e-12 covers
// n * 2^-53 with a wide margin). lse: one rounding to float32.
void expect_matches_naive(const Problem& P, const std::string& what) {
  Result got = run(P), ref = naive(P);
  double u = unit_roundoff(P.dtype);
  EXPECT_TRUE(allclose(got.o, ref.o, 1e-12 * max_abs(P.v), 1.01 * u, what + " o"));
  EXPECT_TRUE(allclose(got.lse, ref.lse, 1e-12, 1.01 * 0x1p-24, what + " lse"));
}

// Equal up to one ulp of the output dtype (used where the CPU reference is in fact bitwise equal,
// without making the test depend on that).
void expect_same(const Result& a, const Result& b, DType t, const std::string& what) {
  EXPECT_TRUE(allclose(a.o, b.o, 1e-300, 2 * unit_roundoff(t), what + " o"));
  EXPECT_TRUE(allclose(a.lse, b.lse, 1e-300, 0x1p-23, what + " lse"));
}

void expect_bitwise(const Result& a, const Result& b, const std::string& what) {
  ASSERT_EQ(a.o.size(), b.o.size());
  for (size_t x = 0; x < a.o.size(); ++x) ASSERT_EQ(a.o[x], b.o[x]) << what << ": o differs at " << x;
  for (size_t x = 0; x < a.lse.size(); ++x) ASSERT_EQ(a.lse[x], b.lse[x]) << what << ": lse differs at " << x;
}

// (1) With topk >= the number of visible blocks, sparse attention is dense causal attention.
struct GroupDim {
  int64_t g, d;
};
class SparseEqualsDense : public ::testing::TestWithParam<GroupDim> {};

TEST_P(SparseEqualsDense, AllBlocksSelected) {
  const auto [g, d] = GetParam();
  const int64_t h_kv = g == 16 ? 1 : 2;
  uint64_t seed = 100 + g * 1000 + d;
  for (int32_t n : {1, 127, 128, 129, 1023}) {
    for (int64_t bk : {64, 128}) {
      // n = 1023 dominates the cost: one block size per shape (both across the shape list).
      if (n == 1023 && bk != (d == 128 ? 128 : 64)) continue;
      Problem P = make_problem(seed++, {n}, g * h_kv, h_kv, d, DType::f32);
      P.bk = bk;
      Result dense = run(P);
      // topk: exactly the visible block count of the last query, and the maximum.
      for (int64_t topk : {int64_t((n - 1) / bk + 1), int64_t(32)}) {
        if (n == 1023 && topk == 32) continue;
        select_all(P, topk);
        std::string what = "n " + std::to_string(n) + " bk " + std::to_string(bk) + " topk " + std::to_string(topk);
        expect_same(run(P), dense, P.dtype, what);
      }
      P.topk = 0;
      if (n == 129) expect_matches_naive(P, "dense n 129");  // the oracle itself is right
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, SparseEqualsDense,
                         ::testing::Values(GroupDim{1, 64}, GroupDim{2, 64}, GroupDim{4, 64}, GroupDim{16, 64},
                                           GroupDim{1, 128}, GroupDim{2, 128}, GroupDim{4, 128}, GroupDim{16, 128},
                                           GroupDim{1, 24}, GroupDim{2, 24}, GroupDim{4, 24}, GroupDim{16, 24}),
                         [](const auto& info) {
                           return "g" + std::to_string(info.param.g) + "_d" + std::to_string(info.param.d);
                         });

TEST(SparseEqualsDense, Long4097) {
  // 4097 tokens need 33 blocks of 128, more than kMaxTopk; the CPU accepts bk = 256 (17 blocks).
  Problem P = make_problem(7, {4097}, 2, 1, 64, DType::f32);
  P.bk = 256;
  Result dense = run(P);
  select_all(P, 17);
  expect_same(run(P), dense, P.dtype, "n 4097");
}

// (2) Dense attention against the naive formula, per dtype, over a varlen batch.
TEST(DenseAttention, MatchesNaive) {
  struct Case {
    int64_t h_q, h_kv, d;
  };
  uint64_t seed = 200;
  for (DType t : {DType::f64, DType::f32, DType::bf16}) {
    for (Case c : {Case{8, 2, 32}, Case{8, 1, 24}, Case{3, 3, 64}, Case{8, 1, 128}}) {
      Problem P = make_problem(seed++, {1, 150, 64, 3}, c.h_q, c.h_kv, c.d, t);
      expect_matches_naive(P, std::string(dtype_name(t)) + " h_q " + std::to_string(c.h_q) + " h_kv " +
                                  std::to_string(c.h_kv) + " d " + std::to_string(c.d));
    }
  }
}

TEST(DenseAttention, ExplicitScale) {
  Problem P = make_problem(210, {90}, 4, 2, 16, DType::f64);
  Result def = run(P);
  // Scores of 3x scale: compare against the naive formula on q scaled by 3 / default scale.
  AttentionParams a = case_params(P);
  Buf q(P.dtype, P.q), k(P.dtype, P.k), v(P.dtype, P.v), o(P.dtype, P.q.size());
  std::vector<float> lse(P.n_q() * P.h_q);
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.o = o.data();
  a.lse = lse.data();
  a.scale = 0.75f;
  dense_attention_forward(a);
  Problem Q = P;
  for (double& x : Q.q) x *= 0.75 / P.scale();
  Result ref = naive(Q);
  EXPECT_TRUE(allclose(o.to_double(), ref.o, 1e-12, 1e-12, "o at scale 0.75"));
  EXPECT_TRUE(allclose(std::vector<double>(lse.begin(), lse.end()), ref.lse, 1e-12, 0x1p-23, "lse at scale 0.75"));
  EXPECT_GT(rel_l2(o.to_double(), def.o), 1e-3);  // the scale did change the result
}

// (3) Sparse attention against the naive masked formula on random selections.
TEST(SparseAttention, RandomSelectionsMatchNaive) {
  struct Case {
    int64_t h_q, h_kv, d, bk, topk;
    int32_t every, none;
    DType t;
  };
  uint64_t seed = 300;
  for (Case c : {Case{8, 2, 32, 64, 4, -1, -1, DType::f64}, Case{8, 2, 32, 64, 4, 1, 3, DType::f32},
                 Case{4, 4, 24, 32, 6, 0, 5, DType::bf16}, Case{16, 1, 128, 128, 2, -1, 2, DType::f32},
                 Case{6, 3, 16, 16, 32, 4, 0, DType::f64}}) {
    Problem P = make_problem(seed++, {600}, c.h_q, c.h_kv, c.d, c.t);
    P.bk = c.bk;
    select_random(P, c.topk, seed++, c.every, c.none);
    expect_matches_naive(P, std::string(dtype_name(c.t)) + " bk " + std::to_string(c.bk) + " topk " +
                                std::to_string(c.topk) + " every " + std::to_string(c.every) + " none " +
                                std::to_string(c.none));
  }
}

TEST(SparseAttention, EmptyRowsGiveZeroAndMinusInf) {
  Problem P = make_problem(320, {200}, 4, 2, 16, DType::f32);
  select_random(P, 3, 321);
  for (int64_t i = 0; i < P.n_q(); i += 7)  // every 7th query: group 1 selects nothing
    std::fill_n(&P.idx[(i * P.h_kv + 1) * P.topk], P.topk, -1);
  Result got = run(P);
  for (int64_t i = 0; i < P.n_q(); i += 7)
    for (int64_t h = 2; h < 4; ++h) {
      ASSERT_EQ(got.lse[i * 4 + h], -kInf) << "query " << i << " head " << h;
      for (int64_t c = 0; c < P.d; ++c) ASSERT_EQ(got.o[(i * 4 + h) * P.d + c], 0.0) << "query " << i;
    }
  expect_matches_naive(P, "with empty rows");
}

// (4) A packed batch equals one call per sequence.
TEST(Varlen, PackedEqualsSeparate) {
  const std::vector<int32_t> lens = {1, 200, 5, 129};
  for (bool sparse : {false, true}) {
    Problem P = make_problem(sparse ? 401 : 400, lens, 8, 2, 32, DType::f32);
    if (sparse) select_random(P, 3, 402);
    Result packed = run(P);
    for (size_t b = 0; b < lens.size(); ++b) {
      Problem S = P;
      int64_t t0 = P.cu_q[b], t1 = P.cu_q[b + 1];
      S.cu_q = S.cu_k = {0, lens[b]};
      S.q.assign(P.q.begin() + t0 * P.h_q * P.d, P.q.begin() + t1 * P.h_q * P.d);
      S.k.assign(P.k.begin() + t0 * P.h_kv * P.d, P.k.begin() + t1 * P.h_kv * P.d);
      S.v.assign(P.v.begin() + t0 * P.h_kv * P.d, P.v.begin() + t1 * P.h_kv * P.d);
      if (sparse) S.idx.assign(P.idx.begin() + t0 * P.h_kv * P.topk, P.idx.begin() + t1 * P.h_kv * P.topk);
      Result one = run(S);
      Result part{std::vector<double>(packed.o.begin() + t0 * P.h_q * P.d, packed.o.begin() + t1 * P.h_q * P.d),
                  std::vector<double>(packed.lse.begin() + t0 * P.h_q, packed.lse.begin() + t1 * P.h_q)};
      expect_same(part, one, P.dtype, std::string(sparse ? "sparse" : "dense") + " sequence " + std::to_string(b));
    }
    expect_matches_naive(P, sparse ? "sparse varlen" : "dense varlen");
  }
}

// (5) Queries given as a chunk (bottom-right aligned, or with explicit positions) equal the
// corresponding rows of the full call.
TEST(Chunked, EqualsRowsOfFullCall) {
  const std::vector<int32_t> lens = {300, 77};
  for (bool sparse : {false, true}) {
    Problem full = make_problem(sparse ? 501 : 500, lens, 4, 2, 16, DType::f32);
    full.bk = 32;
    if (sparse) select_random(full, 4, 502);
    Result ref = run(full);
    std::mt19937_64 rng(503);
    for (bool explicit_pos : {false, true}) {
      // rows[b]: positions within sequence b the chunk asks for.
      std::vector<std::vector<int32_t>> rows(lens.size());
      if (!explicit_pos) {
        for (int32_t p = 220; p < 300; ++p) rows[0].push_back(p);
        for (int32_t p = 67; p < 77; ++p) rows[1].push_back(p);
      } else {
        rows[0] = {0, 299, 31, 32, 150, 150, 7};  // unsorted, repeated, first and last
        for (int x = 0; x < 20; ++x) rows[0].push_back(std::uniform_int_distribution<int32_t>(0, 299)(rng));
        rows[1] = {76, 0, 40};
      }
      Problem C = full;
      C.q.clear();
      C.idx.clear();
      C.q_pos.clear();
      C.cu_q = {0};
      std::vector<int64_t> src;  // row of the full call for each chunk row
      for (size_t b = 0; b < lens.size(); ++b) {
        for (int32_t p : rows[b]) {
          int64_t i = full.cu_q[b] + p;
          src.push_back(i);
          C.q.insert(C.q.end(), full.q.begin() + i * full.h_q * full.d, full.q.begin() + (i + 1) * full.h_q * full.d);
          if (sparse)
            C.idx.insert(C.idx.end(), full.idx.begin() + i * full.h_kv * full.topk,
                         full.idx.begin() + (i + 1) * full.h_kv * full.topk);
          if (explicit_pos) C.q_pos.push_back(p);
        }
        C.cu_q.push_back(int32_t(src.size()));
      }
      Result got = run(C), want;
      for (int64_t i : src) {
        want.o.insert(want.o.end(), ref.o.begin() + i * full.h_q * full.d, ref.o.begin() + (i + 1) * full.h_q * full.d);
        want.lse.insert(want.lse.end(), ref.lse.begin() + i * full.h_q, ref.lse.begin() + (i + 1) * full.h_q);
      }
      std::string what = std::string(sparse ? "sparse" : "dense") + (explicit_pos ? " q_pos" : " bottom-right");
      expect_same(got, want, C.dtype, what);
      expect_matches_naive(C, what);
    }
  }
}

TEST(Chunked, DecodeOneQuery) {
  Problem full = make_problem(510, {700}, 16, 1, 64, DType::bf16);
  full.bk = 128;
  select_random(full, 5, 511, 0);
  Problem C = full;
  C.cu_q = {0, 1};
  C.q.assign(full.q.end() - full.h_q * full.d, full.q.end());
  C.idx.assign(full.idx.end() - full.h_kv * full.topk, full.idx.end());
  Result got = run(C), ref = run(full);
  Result want{std::vector<double>(ref.o.end() - full.h_q * full.d, ref.o.end()),
              std::vector<double>(ref.lse.end() - full.h_q, ref.lse.end())};
  expect_same(got, want, C.dtype, "decode");
  expect_matches_naive(C, "decode");
}

// (6) The order of the blocks within a row does not matter.
TEST(SparseAttention, BlockOrderWithinRowIsIrrelevant) {
  Problem P = make_problem(600, {500}, 8, 2, 64, DType::f32);
  P.bk = 32;
  select_random(P, 8, 601);
  Result a = run(P);
  std::mt19937_64 rng(602);
  for (int64_t row = 0; row < P.n_q() * P.h_kv; ++row) {
    int32_t* e = &P.idx[row * P.topk];
    int64_t valid = std::find(e, e + P.topk, -1) - e;
    std::shuffle(e, e + valid, rng);
  }
  expect_bitwise(run(P), a, "permuted rows");
  // Ascending order (as index_topk writes it) too.
  for (int64_t row = 0; row < P.n_q() * P.h_kv; ++row) {
    int32_t* e = &P.idx[row * P.topk];
    std::sort(e, std::find(e, e + P.topk, -1));
  }
  expect_bitwise(run(P), a, "sorted rows");
}

// Rows are independent of the thread count.
TEST(SparseAttention, ThreadCountDoesNotChangeResult) {
  Problem P = make_problem(650, {300, 41}, 8, 4, 32, DType::f32);
  select_random(P, 4, 651);
  expect_bitwise(run(P, 1), run(P, 2), "1 vs 2 threads");
  P.topk = 0;
  expect_bitwise(run(P, 1), run(P, 2), "dense 1 vs 2 threads");
}

// (7) Non-contiguous strides give the contiguous result, and the gaps of o stay untouched.
TEST(Strides, NonContiguousEqualsContiguous) {
  for (bool sparse : {false, true}) {
    Problem P = make_problem(700, {150, 33}, 8, 2, 16, DType::bf16);
    if (sparse) select_random(P, 3, 701);
    Result ref = run(P);
    const int64_t n_q = P.n_q(), n_k = P.n_k(), h_q = P.h_q, h_kv = P.h_kv, d = P.d;
    // q: the second half of a [n, h_q, 2d] buffer. k: heads padded to d + 3 and tokens by 5 more.
    // v: tokens strided 2 * h_kv * d. o: head-major [h_q, n, d] with a gap of d between heads' rows
    // (stride_tok = 2d), the head stride larger than the token stride.
    Buf q(P.dtype, n_q * h_q * 2 * d), k(P.dtype, n_k * (h_kv * (d + 3) + 5)), v(P.dtype, n_k * 2 * h_kv * d);
    Buf o(P.dtype, h_q * n_q * 2 * d);
    q.poison();
    k.poison();
    v.poison();
    o.poison();
    for (int64_t t = 0; t < n_q; ++t)
      for (int64_t h = 0; h < h_q; ++h)
        for (int64_t c = 0; c < d; ++c) q.set((t * h_q + h) * 2 * d + d + c, P.q[(t * h_q + h) * d + c]);
    for (int64_t t = 0; t < n_k; ++t)
      for (int64_t h = 0; h < h_kv; ++h)
        for (int64_t c = 0; c < d; ++c) {
          k.set(t * (h_kv * (d + 3) + 5) + h * (d + 3) + c, P.k[(t * h_kv + h) * d + c]);
          v.set(t * 2 * h_kv * d + h * d + c, P.v[(t * h_kv + h) * d + c]);
        }
    std::vector<float> lse(n_q * h_q, std::nanf(""));
    AttentionParams a = case_params(P);
    a.q = static_cast<const uint8_t*>(q.data()) + d * dtype_size(P.dtype);
    a.stride_q_tok = h_q * 2 * d;
    a.stride_q_head = 2 * d;
    a.k = k.data();
    a.stride_k_tok = h_kv * (d + 3) + 5;
    a.stride_k_head = d + 3;
    a.v = v.data();
    a.stride_v_tok = 2 * h_kv * d;
    a.stride_v_head = 0;  // default: d
    a.o = o.data();
    a.stride_o_tok = 2 * d;
    a.stride_o_head = n_q * 2 * d;
    a.lse = lse.data();
    if (sparse)
      sparse_attention_forward(a);
    else
      dense_attention_forward(a);
    Result got;
    got.lse.assign(lse.begin(), lse.end());
    for (int64_t t = 0; t < n_q; ++t)
      for (int64_t h = 0; h < h_q; ++h)
        for (int64_t c = 0; c < 2 * d; ++c) {
          double x = o.get(h * n_q * 2 * d + t * 2 * d + c);
          if (c < d)
            got.o.push_back(x);
          else
            ASSERT_TRUE(std::isnan(x)) << "o gap written at token " << t << " head " << h;
        }
    // got.o is [n, h_q, d] in (t, h) order like ref.
    expect_bitwise(got, ref, sparse ? "sparse strided" : "dense strided");
  }
}

}  // namespace
}  // namespace msa::test
