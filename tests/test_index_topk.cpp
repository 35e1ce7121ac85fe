// Tests of msa::index_topk on the CPU: selections, block scores and index lse against a brute
// force written here (full score matrix in double, std::sort of all visible blocks), on single
// sequences, varlen batches, chunked queries and decode, with ties and NaNs planted on purpose.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "test_util.h"

namespace msa::test {
namespace {

constexpr float kPoisonScore = 12345.f;
constexpr int32_t kPoisonIdx = -777;

// One index_topk problem with its data kept as doubles exactly representable in dtype.
struct Problem {
  std::vector<int32_t> lens_q, lens_k;  // per sequence
  std::vector<int32_t> q_pos;           // empty: bottom-right aligned
  int64_t h_kv = 2, d_idx = 32, bk = 64, topk = 4;
  float index_scale = 0.f;
  DType dtype = DType::f32;
  std::vector<double> q, k;  // [n_q, h_kv, d_idx], [n_k, d_idx]

  int64_t n_q() const { return std::accumulate(lens_q.begin(), lens_q.end(), int64_t(0)); }
  int64_t n_k() const { return std::accumulate(lens_k.begin(), lens_k.end(), int64_t(0)); }
  int64_t batch() const { return int64_t(lens_q.size()); }
  double scale() const { return index_scale != 0.f ? index_scale : double(float(1.0 / std::sqrt(double(d_idx)))); }
};

Problem make_problem(uint64_t seed, std::vector<int32_t> lens_q, std::vector<int32_t> lens_k, int64_t h_kv,
                     int64_t d_idx, int64_t bk, int64_t topk, DType dtype) {
  std::mt19937_64 rng(seed);
  Problem pr;
  pr.lens_q = std::move(lens_q);
  pr.lens_k = std::move(lens_k);
  pr.h_kv = h_kv;
  pr.d_idx = d_idx;
  pr.bk = bk;
  pr.topk = topk;
  pr.dtype = dtype;
  pr.q = randn(rng, size_t(pr.n_q() * h_kv * d_idx), 1.0, dtype);
  pr.k = randn(rng, size_t(pr.n_k() * d_idx), 1.0, dtype);
  return pr;
}

Problem make_self(uint64_t seed, std::vector<int32_t> lens, int64_t h_kv, int64_t d_idx, int64_t bk, int64_t topk,
                  DType dtype = DType::f32) {
  return make_problem(seed, lens, lens, h_kv, d_idx, bk, topk, dtype);
}

// Absolute position of every query row and the first key row of its sequence, derived here from
// the lengths rather than taken from the library.
struct Rows {
  std::vector<int64_t> pos, key0, len_k;
};
Rows rows_of(const Problem& pr) {
  Rows rw;
  int64_t key0 = 0, row = 0;
  for (int64_t b = 0; b < pr.batch(); ++b) {
    for (int64_t t = 0; t < pr.lens_q[b]; ++t, ++row) {
      rw.pos.push_back(pr.q_pos.empty() ? pr.lens_k[b] - pr.lens_q[b] + t : pr.q_pos[row]);
      rw.key0.push_back(key0);
      rw.len_k.push_back(pr.lens_k[b]);
    }
    key0 += pr.lens_k[b];
  }
  return rw;
}

// The rule, written as a sort key: numbers before NaN, larger first, then lower block first.
bool ranks_above(float ma, int64_t a, float mb, int64_t b) {
  if (std::isnan(ma) != std::isnan(mb)) return std::isnan(mb);
  if (!std::isnan(ma) && ma != mb) return ma > mb;
  return a < b;
}

struct Ref {
  std::vector<std::set<int32_t>> sel;  // [n_q * h_kv]
  std::vector<std::vector<float>> m;   // [n_q * h_kv][n_vis], float block scores
  std::vector<double> block_scores;    // [n_q, h_kv, n_blocks]
  std::vector<double> lse;             // [n_q, h_kv]
  Rows rows;
};

Ref brute_force(const Problem& pr, int64_t n_blocks) {
  Ref ref;
  ref.rows = rows_of(pr);
  const int64_t n_q = pr.n_q(), h_kv = pr.h_kv, d = pr.d_idx, bk = pr.bk;
  const double scale = pr.scale();
  const double inf = std::numeric_limits<double>::infinity(), nan = std::nan("");
  ref.block_scores.assign(size_t(n_q * h_kv * n_blocks), -inf);
  ref.lse.assign(size_t(n_q * h_kv), nan);
  for (int64_t i = 0; i < n_q; ++i) {
    const int64_t pos = ref.rows.pos[i], len_k = ref.rows.len_k[i], key0 = ref.rows.key0[i];
    for (int64_t r = 0; r < h_kv; ++r) {
      // Full score row over every key of the sequence, visible or not; the mask comes after.
      std::vector<double> s(len_k);
      for (int64_t j = 0; j < len_k; ++j) {
        double acc = 0;
        for (int64_t c = 0; c < d; ++c) acc += pr.q[(i * h_kv + r) * d + c] * pr.k[(key0 + j) * d + c];
        s[j] = acc * scale;
      }
      const int64_t n_vis = pos / bk + 1;
      std::vector<float> m(n_vis);
      for (int64_t b = 0; b < n_vis; ++b) {
        double mx = nan;
        bool any = false;
        for (int64_t j = b * bk; j < (b + 1) * bk && j <= pos; ++j) {
          if (std::isnan(s[j])) continue;
          mx = any ? std::max(mx, s[j]) : s[j];
          any = true;
        }
        m[b] = float(mx);
        if (b < n_blocks) ref.block_scores[(i * h_kv + r) * n_blocks + b] = mx;
      }
      std::vector<int32_t> order(n_vis);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return ranks_above(m[a], a, m[b], b); });
      std::set<int32_t> sel;
      if (n_vis <= pr.topk) {
        for (int32_t b = 0; b < n_vis; ++b) sel.insert(b);
      } else {
        sel.insert(int32_t(n_vis - 1));
        for (int32_t b : order)
          if (int64_t(sel.size()) < pr.topk && b != n_vis - 1) sel.insert(b);
      }
      // logsumexp over the visible tokens of the selected blocks, NaN if any of them is NaN.
      std::vector<double> sup;
      for (int32_t b : sel)
        for (int64_t j = b * bk; j < (b + 1) * bk && j <= pos; ++j) sup.push_back(s[j]);
      bool has_nan = std::any_of(sup.begin(), sup.end(), [](double x) { return std::isnan(x); });
      double mx = *std::max_element(sup.begin(), sup.end());
      double lse = nan;
      if (!has_nan) {
        double sum = 0;
        for (double x : sup) sum += std::exp(x - mx);
        lse = std::isinf(mx) ? mx : mx + std::log(sum);
      }
      ref.lse[i * h_kv + r] = lse;
      ref.sel.push_back(sel);
      ref.m.push_back(m);
    }
  }
  return ref;
}

struct Out {
  std::vector<int32_t> topk_idx;
  std::vector<float> block_scores, lse;
};

struct RunOpts {
  int64_t n_blocks = -1;  // -1: no block_scores; 0: index_block_count
  bool lse = true;
  int num_threads = 0;
  int64_t pad_q_head = 0, pad_q_tok = 0, pad_k_tok = 0;  // > 0: strided inputs with garbage in the gaps
};

Out run(const Problem& pr, const RunOpts& o = {}) {
  const int64_t n_q = pr.n_q(), n_k = pr.n_k(), h_kv = pr.h_kv, d = pr.d_idx;
  std::vector<int32_t> cu_q = cu_from_lengths(pr.lens_q), cu_k = cu_from_lengths(pr.lens_k);
  IndexTopkParams p;
  p.seq.n_q = n_q;
  p.seq.n_k = n_k;
  p.seq.batch = pr.batch();
  p.seq.cu_seqlens_q = cu_q.data();
  p.seq.cu_seqlens_k = cu_k.data();
  p.seq.q_pos = pr.q_pos.empty() ? nullptr : pr.q_pos.data();
  p.h_kv = h_kv;
  p.d_idx = d;
  p.bk = pr.bk;
  p.topk = pr.topk;
  p.index_scale = pr.index_scale;
  p.dtype = pr.dtype;

  // Strided layouts: the gaps hold huge values, so reading one would change the selection.
  const int64_t sh = d + o.pad_q_head, st = h_kv * sh + o.pad_q_tok, sk = d + o.pad_k_tok;
  Buf q(pr.dtype, size_t(std::max<int64_t>(n_q * st, 1))), k(pr.dtype, size_t(std::max<int64_t>(n_k * sk, 1)));
  for (size_t e = 0; e < q.size(); ++e) q.set(e, 1e30);
  for (size_t e = 0; e < k.size(); ++e) k.set(e, 1e30);
  for (int64_t i = 0; i < n_q; ++i)
    for (int64_t r = 0; r < h_kv; ++r)
      for (int64_t c = 0; c < d; ++c) q.set(size_t(i * st + r * sh + c), pr.q[(i * h_kv + r) * d + c]);
  for (int64_t j = 0; j < n_k; ++j)
    for (int64_t c = 0; c < d; ++c) k.set(size_t(j * sk + c), pr.k[j * d + c]);
  p.q_idx = q.data();
  p.k_idx = k.data();
  if (o.pad_q_head || o.pad_q_tok) {
    p.stride_q_idx_head = sh;
    p.stride_q_idx_tok = st;
  }
  if (o.pad_k_tok) p.stride_k_idx_tok = sk;

  Out out;
  out.topk_idx.assign(size_t(n_q * h_kv * pr.topk), kPoisonIdx);
  p.topk_idx = out.topk_idx.data();
  if (o.n_blocks >= 0) {
    p.n_blocks = o.n_blocks > 0 ? o.n_blocks : index_block_count(p.seq, pr.bk);
    out.block_scores.assign(size_t(n_q * h_kv * p.n_blocks), kPoisonScore);
    p.block_scores = out.block_scores.data();
  }
  if (o.lse) {
    out.lse.assign(size_t(n_q * h_kv), kPoisonScore);
    p.index_lse = out.lse.data();
  }
  Exec ex;
  ex.num_threads = o.num_threads;
  index_topk(p, ex);
  return out;
}

// Contract of every output row: valid entries ascending and distinct, visible, the own block
// among them, -1 only as a tail; exactly min(topk, n_vis) entries.
::testing::AssertionResult check_invariants(const Problem& pr, const std::vector<int32_t>& idx) {
  Rows rw = rows_of(pr);
  for (int64_t i = 0; i < pr.n_q(); ++i)
    for (int64_t r = 0; r < pr.h_kv; ++r) {
      const int32_t* row = &idx[(i * pr.h_kv + r) * pr.topk];
      const int64_t own = rw.pos[i] / pr.bk, n_vis = own + 1;
      const int64_t want = std::min(pr.topk, n_vis);
      auto fail = [&](const char* what) {
        std::ostringstream os;
        for (int64_t t = 0; t < pr.topk; ++t) os << row[t] << " ";
        return ::testing::AssertionFailure()
               << "row (" << i << ", " << r << ") pos " << rw.pos[i] << ": " << what << "; got [ " << os.str() << "]";
      };
      for (int64_t t = 0; t < pr.topk; ++t) {
        if (t < want) {
          if (row[t] < 0 || row[t] > own) return fail("entry out of the visible blocks");
          if (t > 0 && row[t] <= row[t - 1]) return fail("not strictly ascending");
        } else if (row[t] != -1) {
          return fail("expected -1 padding after min(topk, n_vis) entries");
        }
      }
      if (row[want - 1] != own) return fail("own block missing (it is the largest, so it must come last)");
      if (n_vis <= pr.topk)
        for (int64_t t = 0; t < n_vis; ++t)
          if (row[t] != t) return fail("a row seeing <= topk blocks must select all of them");
    }
  return ::testing::AssertionSuccess();
}

// Selections as sets, and the rule judged on the reference block scores: every selected
// non-local block ranks above every unselected visible block.
::testing::AssertionResult check_selection(const Problem& pr, const Ref& ref, const std::vector<int32_t>& idx) {
  int64_t bad = 0;
  std::ostringstream os;
  for (int64_t ir = 0; ir < pr.n_q() * pr.h_kv; ++ir) {
    std::set<int32_t> got;
    for (int64_t t = 0; t < pr.topk; ++t)
      if (idx[ir * pr.topk + t] >= 0) got.insert(idx[ir * pr.topk + t]);
    const auto& m = ref.m[ir];
    const int32_t own = int32_t(m.size()) - 1;
    bool rule_ok = true;
    for (int32_t s : got)
      for (int32_t u = 0; u <= own; ++u)
        if (s != own && !got.count(u) && !ranks_above(m[s], s, m[u], u)) rule_ok = false;
    if (got != ref.sel[ir] || !rule_ok) {
      if (bad++ < 5) {
        os << "\n  row (" << ir / pr.h_kv << ", " << ir % pr.h_kv << ") pos " << ref.rows.pos[ir / pr.h_kv]
           << (rule_ok ? "" : " breaks the rule") << ": got {";
        for (int32_t b : got) os << " " << b << ":" << m[b];
        os << " } expected {";
        for (int32_t b : ref.sel[ir]) os << " " << b << ":" << m[b];
        os << " }";
      }
    }
  }
  if (bad) return ::testing::AssertionFailure() << bad << " rows differ" << os.str();
  return ::testing::AssertionSuccess();
}

std::vector<double> to_d(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// Scores are double sums rounded to float once: the library and the brute force differ only by
// summation order (~1e-16 relative) before that rounding, so one float ulp bounds the gap.
constexpr double kFloatRtol = 1.2e-7;
constexpr double kAtol = 1e-12;

void check_all(const Problem& pr, int64_t n_blocks_extra = 1) {
  int64_t max_len = *std::max_element(pr.lens_k.begin(), pr.lens_k.end());
  int64_t n_blocks = (max_len + pr.bk - 1) / pr.bk + n_blocks_extra;
  Ref ref = brute_force(pr, n_blocks);
  RunOpts o;
  o.n_blocks = n_blocks;
  Out out = run(pr, o);
  EXPECT_TRUE(check_invariants(pr, out.topk_idx));
  EXPECT_TRUE(check_selection(pr, ref, out.topk_idx));
  EXPECT_TRUE(allclose(to_d(out.block_scores), ref.block_scores, kAtol, kFloatRtol, "block_scores"));
  EXPECT_TRUE(allclose(to_d(out.lse), ref.lse, kAtol, kFloatRtol, "index_lse"));
}

TEST(IndexTopk, SingleSequenceLengths) {
  uint64_t seed = 100;
  for (int32_t len : {1, 127, 128, 129, 1023})
    for (int64_t bk : {16, 64, 128})
      for (int64_t topk : {1, 4, 16}) {
        SCOPED_TRACE(::testing::Message() << "len " << len << " bk " << bk << " topk " << topk);
        check_all(make_self(seed++, {len}, 2, 16, bk, topk));
      }
}

TEST(IndexTopk, Dtypes) {
  uint64_t seed = 200;
  for (DType t : {DType::f32, DType::bf16, DType::f64})
    for (int64_t d_idx : {64, 128}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(t) << " d_idx " << d_idx);
      check_all(make_self(seed++, {400}, 4, d_idx, 16, 8, t));
    }
  Problem pr = make_self(seed++, {333}, 3, 48, 16, 5, DType::bf16);
  pr.index_scale = 0.37f;
  SCOPED_TRACE("explicit index_scale");
  check_all(pr);
}

TEST(IndexTopk, VarlenBatchMatchesSeparateCalls) {
  for (DType t : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(t));
    std::vector<int32_t> lens = {1, 700, 3, 129, 1, 256, 64};
    Problem pr = make_self(t == DType::f32 ? 300 : 301, lens, 2, 32, 64, 4, t);
    check_all(pr, 2);

    // Each sequence alone (its own rows of q and k) gives exactly the packed rows.
    RunOpts o;
    o.n_blocks = 12;  // 700 keys / 64 -> 11 blocks, plus one column of -inf
    Out packed = run(pr, o);
    int64_t q0 = 0;
    for (size_t b = 0; b < lens.size(); ++b) {
      Problem one = pr;
      one.lens_q = one.lens_k = {lens[b]};
      one.q.assign(pr.q.begin() + q0 * pr.h_kv * pr.d_idx, pr.q.begin() + (q0 + lens[b]) * pr.h_kv * pr.d_idx);
      one.k.assign(pr.k.begin() + q0 * pr.d_idx, pr.k.begin() + (q0 + lens[b]) * pr.d_idx);
      Out alone = run(one, o);
      const int64_t w = pr.h_kv * pr.topk;
      EXPECT_TRUE(std::equal(alone.topk_idx.begin(), alone.topk_idx.end(), packed.topk_idx.begin() + q0 * w))
          << "sequence " << b;
      EXPECT_TRUE(std::equal(alone.lse.begin(), alone.lse.end(), packed.lse.begin() + q0 * pr.h_kv))
          << "sequence " << b;
      EXPECT_EQ(0, std::memcmp(alone.block_scores.data(), packed.block_scores.data() + q0 * pr.h_kv * o.n_blocks,
                               alone.block_scores.size() * sizeof(float)))
          << "sequence " << b;
      q0 += lens[b];
    }
  }
}

TEST(IndexTopk, ChunkedQueriesBottomRight) {
  // Chunked prefill: each sequence's queries are its last len_q positions.
  check_all(make_problem(400, {5, 64, 77, 1}, {300, 1000, 77, 129}, 2, 32, 64, 4, DType::f32));
  check_all(make_problem(401, {17, 200}, {17, 1023}, 1, 16, 16, 16, DType::bf16));
}

TEST(IndexTopk, ChunkedQueriesExplicitPositions) {
  // Context parallelism: arbitrary positions, unsorted and repeated, including 0 and len_k - 1.
  Problem pr = make_problem(500, {40, 9}, {900, 130}, 2, 32, 16, 6, DType::f32);
  std::mt19937_64 rng(501);
  for (int64_t b = 0, row = 0; b < pr.batch(); ++b)
    for (int32_t t = 0; t < pr.lens_q[b]; ++t, ++row) {
      std::uniform_int_distribution<int32_t> u(0, pr.lens_k[b] - 1);
      pr.q_pos.push_back(t == 0 ? 0 : t == 1 ? pr.lens_k[b] - 1 : u(rng));
    }
  check_all(pr);
  // More queries than keys is fine with explicit positions.
  Problem many = make_problem(502, {50}, {20}, 2, 16, 4, 3, DType::f64);
  for (int32_t t = 0; t < 50; ++t) many.q_pos.push_back(t % 20);
  check_all(many);
}

TEST(IndexTopk, Decode) {
  // One query per sequence at its last position, the paper's defaults bk = 128, topk = 16.
  check_all(make_problem(600, {1, 1, 1, 1}, {1, 129, 2000, 4097}, 4, 32, 128, 16, DType::bf16));
}

TEST(IndexTopk, TiesBreakTowardLowerBlock) {
  const int64_t bk = 16, topk = 5, len = 300;
  // Every block holds the same key rows, so all full blocks share their max score exactly.
  Problem pr = make_self(700, {int32_t(len)}, 2, 32, bk, topk);
  for (int64_t j = bk; j < len; ++j)
    for (int64_t c = 0; c < pr.d_idx; ++c) pr.k[j * pr.d_idx + c] = pr.k[(j % bk) * pr.d_idx + c];
  check_all(pr);
  Out out = run(pr);
  for (int64_t i = 0; i < len; ++i)
    for (int64_t r = 0; r < pr.h_kv; ++r) {
      const int64_t own = i / bk;
      if (own + 1 <= topk) continue;
      std::vector<int32_t> want;
      for (int32_t b = 0; b < topk - 1; ++b) want.push_back(b);
      want.push_back(int32_t(own));
      std::vector<int32_t> got(out.topk_idx.begin() + (i * pr.h_kv + r) * topk,
                               out.topk_idx.begin() + (i * pr.h_kv + r + 1) * topk);
      ASSERT_EQ(got, want) << "row (" << i << ", " << r << ")";
    }

  // Blocks drawn from a pool of three contents: ties among many blocks at every rank.
  Problem pool = make_self(701, {int32_t(len)}, 3, 32, bk, topk, DType::bf16);
  std::mt19937_64 rng(702);
  std::uniform_int_distribution<int64_t> pick(0, 2);
  for (int64_t b = 3; b * bk < len; ++b) {
    int64_t src = pick(rng);
    for (int64_t t = 0; t < bk && b * bk + t < len; ++t)
      for (int64_t c = 0; c < pool.d_idx; ++c)
        pool.k[(b * bk + t) * pool.d_idx + c] = pool.k[(src * bk + t) * pool.d_idx + c];
  }
  SCOPED_TRACE("pool of three block contents");
  check_all(pool);
}

TEST(IndexTopk, NaNScoresRankLast) {
  for (DType t : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(t));
    const int64_t bk = 16, topk = 4, len = 300, h_kv = 2;
    Problem pr = make_self(t == DType::f32 ? 800 : 801, {int32_t(len)}, h_kv, 32, bk, topk, t);
    const double nan = std::nan("");
    // Block 2: every key NaN, so its block score is NaN. Blocks 4 and 5: one NaN key each, which
    // the max ignores (but a selected block's lse sees it).
    for (int64_t j = 2 * bk; j < 3 * bk; ++j) pr.k[j * pr.d_idx + 3] = nan;
    pr.k[(4 * bk + 7) * pr.d_idx] = nan;
    pr.k[(5 * bk) * pr.d_idx + 1] = nan;
    // One query row of group 1 entirely NaN: all its blocks tie at NaN.
    const int64_t nan_row = 250;
    for (int64_t c = 0; c < pr.d_idx; ++c) pr.q[(nan_row * h_kv + 1) * pr.d_idx + c] = nan;
    check_all(pr);

    Out out = run(pr);
    for (int64_t i = 0; i < len; ++i)
      for (int64_t r = 0; r < h_kv; ++r) {
        const int32_t* row = &out.topk_idx[(i * h_kv + r) * topk];
        const int64_t own = i / bk;
        if (own + 1 <= topk) continue;
        if (i == nan_row && r == 1) {
          EXPECT_EQ(std::vector<int32_t>(row, row + topk), (std::vector<int32_t>{0, 1, 2, int32_t(own)}));
          EXPECT_TRUE(std::isnan(out.lse[i * h_kv + r]));
        } else if (own != 2) {
          EXPECT_EQ(std::count(row, row + topk, 2), 0) << "NaN block 2 selected by row (" << i << ", " << r << ")";
        }
      }
  }
}

TEST(IndexTopk, StridedInputsMatchContiguous) {
  Problem pr = make_problem(900, {30, 200}, {500, 200}, 3, 40, 16, 6, DType::bf16);
  RunOpts base;
  base.n_blocks = 0;
  Out a = run(pr, base);
  RunOpts strided = base;
  strided.pad_q_head = 3;
  strided.pad_q_tok = 5;
  strided.pad_k_tok = 7;
  Out b = run(pr, strided);
  EXPECT_EQ(a.topk_idx, b.topk_idx);
  EXPECT_EQ(0, std::memcmp(a.block_scores.data(), b.block_scores.data(), a.block_scores.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * sizeof(float)));
  EXPECT_TRUE(check_invariants(pr, b.topk_idx));
}

TEST(IndexTopk, ThreadsAndOptionalOutputsDoNotChangeResults) {
  Problem pr = make_problem(1000, {1, 333, 600}, {1, 333, 600}, 2, 32, 16, 8, DType::f32);
  RunOpts full;
  full.n_blocks = 0;
  full.num_threads = 1;
  Out one = run(pr, full);
  full.num_threads = 2;
  Out two = run(pr, full);
  RunOpts bare;
  bare.lse = false;
  Out none = run(pr, bare);
  EXPECT_EQ(one.topk_idx, two.topk_idx);
  EXPECT_EQ(one.topk_idx, none.topk_idx);
  EXPECT_EQ(0, std::memcmp(one.block_scores.data(), two.block_scores.data(), one.block_scores.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(one.lse.data(), two.lse.data(), one.lse.size() * sizeof(float)));
}

}  // namespace
}  // namespace msa::test
