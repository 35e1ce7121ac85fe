// Tests of msa::index_topk on the CUDA backend against the CPU backend on the same bf16 inputs:
// selections (as sets; a mismatch passes only if the scores show a near-tie within a derived
// tolerance, and exact ties built on purpose must match exactly), block scores and index_lse,
// on single sequences of awkward lengths, every compiled (d_idx, bk) with topk 1/16/32, varlen
// batches, chunked queries, explicit positions, planted ties and NaNs, strided and misaligned
// operands, garbage varlen contents (memory safety), and 20 bitwise-identical repeats.
// GPU tests skip with a message when no device is visible.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

namespace msa::test {
namespace {

TEST(CudaIndexTopk, BadArgumentsThrowBeforeLaunch) {
  REQUIRE_CUDA_BUILD();
  IndexTopkParams p;
  p.seq.n_q = p.seq.n_k = 8;
  p.h_kv = 1;
  p.d_idx = 32;
  p.bk = 64;
  Exec ex;
  ex.backend = Backend::cuda;
  EXPECT_TRUE(throws_error([&] { index_topk(p, ex); }, {"msa::index_topk", "d_idx = 32"}));
  p.d_idx = 64;
  p.bk = 32;
  EXPECT_TRUE(throws_error([&] { index_topk(p, ex); }, {"bk = 32"}));
  p.bk = 64;
  p.dtype = DType::f32;
  EXPECT_TRUE(throws_error([&] { index_topk(p, ex); }, {"bfloat16"}));
  p.dtype = DType::bf16;
  EXPECT_TRUE(throws_error([&] { index_topk(p, ex); }, {"q_idx"}));  // null inputs
  p.seq.batch = 2;  // several sequences need cu_seqlens_q, even as device pointers
  EXPECT_TRUE(throws_error([&] { index_topk(p, ex); }, {"cu_seqlens_q"}));
}

#ifndef MSA_WITH_CUDA

TEST(CudaIndexTopk, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

// Outputs are filled with this byte before every run: int 0x7f7f7f7f, float 3.4e38.
constexpr unsigned char kPoisonByte = 0x7f;

// One problem: lengths, layout and the logical data (doubles exactly representable in bf16).
struct Case {
  std::vector<int32_t> lens_q, lens_k;
  std::vector<int32_t> q_pos;  // empty: bottom-right aligned
  int64_t h_kv = 4, d = 128, bk = 128, topk = 16;
  bool pass_cu = true;  // false: single sequence, null cu_seqlens
  int64_t q_stride_tok = 0, q_stride_head = 0, k_stride = 0;  // 0: contiguous
  int64_t q_offset = 0, k_offset = 0;                           // elements before the first row
  uint64_t seed = 1;
  std::vector<double> q, k;  // [n_q, h_kv, d], [n_k, d]

  int64_t n_q() const { return std::accumulate(lens_q.begin(), lens_q.end(), int64_t(0)); }
  int64_t n_k() const { return std::accumulate(lens_k.begin(), lens_k.end(), int64_t(0)); }
  int64_t sq_head() const { return q_stride_head ? q_stride_head : d; }
  int64_t sq_tok() const { return q_stride_tok ? q_stride_tok : h_kv * sq_head(); }
  int64_t sk() const { return k_stride ? k_stride : d; }
  int64_t n_blocks() const {
    int64_t mx = 0;
    for (int32_t l : lens_k) mx = std::max<int64_t>(mx, l);
    return (mx + bk - 1) / bk + 1;  // one spare column: it must be -inf too
  }
};

Case make_case(uint64_t seed, std::vector<int32_t> lens_q, std::vector<int32_t> lens_k, int64_t h_kv, int64_t d,
               int64_t bk, int64_t topk) {
  Case c;
  c.seed = seed;
  c.lens_q = std::move(lens_q);
  c.lens_k = std::move(lens_k);
  c.h_kv = h_kv;
  c.d = d;
  c.bk = bk;
  c.topk = topk;
  std::mt19937_64 rng(seed);
  c.q = randn(rng, size_t(c.n_q() * h_kv * d), 1.0, DType::bf16);
  c.k = randn(rng, size_t(c.n_k() * d), 1.0, DType::bf16);
  return c;
}

Case make_self(uint64_t seed, std::vector<int32_t> lens, int64_t h_kv, int64_t d, int64_t bk, int64_t topk) {
  return make_case(seed, lens, lens, h_kv, d, bk, topk);
}

struct Out {
  std::vector<int32_t> idx;   // [n_q * h_kv * topk]
  std::vector<float> bs;      // [n_q * h_kv * n_blocks] (empty if not asked)
  std::vector<float> lse;     // [n_q * h_kv] (empty if not asked)
};

// Strided bf16 storage of the logical tensors; the padding holds NaN so that a read of it shows.
struct Storage {
  std::vector<bf16> q, k;
  std::vector<int32_t> cu_q, cu_k;
};
Storage store(const Case& c) {
  Storage s;
  const bf16 nan = float_to_bf16(std::nanf(""));
  s.q.assign(size_t(c.q_offset + std::max<int64_t>(c.n_q(), 1) * c.sq_tok()), nan);
  for (int64_t i = 0; i < c.n_q(); ++i)
    for (int64_t r = 0; r < c.h_kv; ++r)
      for (int64_t e = 0; e < c.d; ++e)
        s.q[c.q_offset + i * c.sq_tok() + r * c.sq_head() + e] = float_to_bf16(float(c.q[(i * c.h_kv + r) * c.d + e]));
  s.k.assign(size_t(c.k_offset + std::max<int64_t>(c.n_k(), 1) * c.sk()), nan);
  for (int64_t j = 0; j < c.n_k(); ++j)
    for (int64_t e = 0; e < c.d; ++e) s.k[c.k_offset + j * c.sk() + e] = float_to_bf16(float(c.k[j * c.d + e]));
  s.cu_q = cu_from_lengths(c.lens_q);
  s.cu_k = cu_from_lengths(c.lens_k);
  return s;
}

IndexTopkParams params_of(const Case& c) {
  IndexTopkParams p;
  p.seq.n_q = c.n_q();
  p.seq.n_k = c.n_k();
  p.seq.batch = int64_t(c.lens_q.size());
  p.h_kv = c.h_kv;
  p.d_idx = c.d;
  p.bk = c.bk;
  p.topk = c.topk;
  p.dtype = DType::bf16;
  p.stride_q_idx_tok = c.sq_tok();
  p.stride_q_idx_head = c.sq_head();
  p.stride_k_idx_tok = c.sk();
  return p;
}

Out run_cpu(const Case& c, bool want_bs, bool want_lse) {
  Storage s = store(c);
  IndexTopkParams p = params_of(c);
  if (c.pass_cu) {
    p.seq.cu_seqlens_q = s.cu_q.data();
    p.seq.cu_seqlens_k = s.cu_k.data();
  }
  if (!c.q_pos.empty()) p.seq.q_pos = c.q_pos.data();
  p.q_idx = s.q.data() + c.q_offset;
  p.k_idx = s.k.data() + c.k_offset;
  Out o;
  o.idx.assign(size_t(c.n_q() * c.h_kv * c.topk), -777);
  p.topk_idx = o.idx.data();
  if (want_bs) {
    o.bs.assign(size_t(c.n_q() * c.h_kv * c.n_blocks()), 12345.f);
    p.block_scores = o.bs.data();
    p.n_blocks = c.n_blocks();
  }
  if (want_lse) {
    o.lse.assign(size_t(c.n_q() * c.h_kv), 12345.f);
    p.index_lse = o.lse.data();
  }
  index_topk(p, Exec{});
  return o;
}

// Runs the CUDA backend `reps` times (outputs poisoned before each run) and returns the last
// result; any run that differs bitwise from the first sets *deterministic = false.
Out run_gpu(const Case& c, bool want_bs, bool want_lse, int reps = 1, bool* deterministic = nullptr) {
  Storage s = store(c);
  IndexTopkParams p = params_of(c);
  DevBuf<bf16> q(s.q), k(s.k);
  DevBuf<int32_t> cu_q(s.cu_q), cu_k(s.cu_k), q_pos(c.q_pos);
  if (c.pass_cu) {
    p.seq.cu_seqlens_q = cu_q.ptr;
    p.seq.cu_seqlens_k = cu_k.ptr;
  }
  if (!c.q_pos.empty()) p.seq.q_pos = q_pos.ptr;
  p.q_idx = q.ptr + c.q_offset;
  p.k_idx = k.ptr + c.k_offset;
  DevBuf<int32_t> idx(size_t(c.n_q() * c.h_kv * c.topk));
  DevBuf<float> bs(want_bs ? size_t(c.n_q() * c.h_kv * c.n_blocks()) : 0), lse(want_lse ? size_t(c.n_q() * c.h_kv) : 0);
  p.topk_idx = idx.ptr;
  if (want_bs) {
    p.block_scores = bs.ptr;
    p.n_blocks = c.n_blocks();
  }
  if (want_lse) p.index_lse = lse.ptr;
  Exec ex;
  ex.backend = Backend::cuda;
  Out first, o;
  for (int rep = 0; rep < reps; ++rep) {
    idx.poison(kPoisonByte);
    bs.poison(kPoisonByte);
    lse.poison(kPoisonByte);
    index_topk(p, ex);
    cuda_check(cudaDeviceSynchronize(), "index_topk kernel");
    o.idx = idx.get();
    o.bs = bs.get();
    o.lse = lse.get();
    if (rep == 0) {
      first = o;
    } else if (deterministic) {
      const bool same = o.idx == first.idx && bitwise_equal(o.bs, first.bs) && bitwise_equal(o.lse, first.lse);
      if (!same) *deterministic = false;
    }
  }
  return o;
}

// Positions and first key row of each query token, from the lengths.
struct RowsInfo {
  std::vector<int64_t> pos, key0;
};
RowsInfo rows_info(const Case& c) {
  RowsInfo ri;
  int64_t key0 = 0, row = 0;
  for (size_t b = 0; b < c.lens_q.size(); ++b) {
    for (int64_t t = 0; t < c.lens_q[b]; ++t, ++row) {
      ri.pos.push_back(c.q_pos.empty() ? c.lens_k[b] - c.lens_q[b] + t : c.q_pos[row]);
      ri.key0.push_back(key0);
    }
    key0 += c.lens_k[b];
  }
  return ri;
}

// Bound on |fp32 tensor-core dot - exact dot| * scale for one row: |sum q k| accumulated in fp32
// over d terms errs by at most ~d * 2^-24 * sum |q_e k_e| <= d * 2^-24 * |q| |k| (Cauchy-Schwarz);
// 8x that, for the unspecified order and rounding inside the tensor core.
double score_tol(const Case& c, int64_t row, double kmax) {
  double qn = 0;
  for (int64_t e = 0; e < c.d; ++e) qn += c.q[row * c.d + e] * c.q[row * c.d + e];
  const double scale = 1.0 / std::sqrt(double(c.d));
  const double t = scale * std::sqrt(qn) * kmax * double(c.d) * std::ldexp(1.0, -21);
  return std::isfinite(t) ? t + 1e-7 : 0.0;
}

// Double-precision logsumexp of the scores of row (i, r) over the visible keys of blocks sel.
double lse_of(const Case& c, const RowsInfo& ri, int64_t i, int64_t r, const std::vector<int32_t>& sel) {
  const double scale = double(float(1.0 / std::sqrt(double(c.d))));
  std::vector<double> s;
  for (int32_t b : sel)
    for (int64_t j = b * c.bk; j < (b + 1) * c.bk && j <= ri.pos[i]; ++j) {
      double acc = 0;
      for (int64_t e = 0; e < c.d; ++e) acc += c.q[(i * c.h_kv + r) * c.d + e] * c.k[(ri.key0[i] + j) * c.d + e];
      s.push_back(acc * scale);
    }
  double mx = -INFINITY;
  for (double x : s) {
    if (std::isnan(x)) return NAN;
    mx = std::max(mx, x);
  }
  double sum = 0;
  for (double x : s) sum += std::exp(x - mx);
  return mx + std::log(sum);
}

// "a is no worse than b" for a block selected by the GPU (a) against one the CPU chose instead
// (b), allowing the rounding tolerance; NaN ranks last and NaN ties go to the lower block.
bool no_worse(float ma, int32_t a, float mb, int32_t b, double tol) {
  const bool na = std::isnan(ma), nb = std::isnan(mb);
  if (na && nb) return a < b;
  if (nb) return true;
  if (na) return false;
  return double(ma) >= double(mb) - 2 * tol;
}

// Compares a GPU result with the CPU one. exact: selections must be equal as sets (ties built
// on purpose). Reports the first failing row and the count of near-tie differences.
::testing::AssertionResult compare(const Case& c, const Out& g, const Out& ref, bool exact, int* n_near_ties = nullptr) {
  const RowsInfo ri = rows_info(c);
  const int64_t n_q = c.n_q(), h = c.h_kv, topk = c.topk, nb = c.n_blocks();
  double kmax = 0;
  for (int64_t j = 0; j < c.n_k(); ++j) {
    double kn = 0;
    for (int64_t e = 0; e < c.d; ++e) kn += c.k[j * c.d + e] * c.k[j * c.d + e];
    if (std::isfinite(kn)) kmax = std::max(kmax, std::sqrt(kn));
  }
  int near = 0;
  double worst_bs = 0, worst_lse = 0;
  for (int64_t i = 0; i < n_q; ++i)
    for (int64_t r = 0; r < h; ++r) {
      const int64_t row = i * h + r;
      std::ostringstream where;
      where << "row (" << i << ", " << r << ") at position " << ri.pos[i];
      const int32_t* gi = &g.idx[row * topk];
      const int32_t* ci = &ref.idx[row * topk];
      const int64_t own = ri.pos[i] / c.bk, n_sel = std::min<int64_t>(topk, own + 1);
      // Structure: n_sel ascending visible blocks ending with the local block, then -1.
      for (int64_t t = 0; t < topk; ++t) {
        const bool ok = t < n_sel ? (gi[t] >= 0 && gi[t] <= own && (t == 0 || gi[t] > gi[t - 1])) : gi[t] == -1;
        if (!ok)
          return ::testing::AssertionFailure() << where.str() << ": topk_idx[" << t << "] = " << gi[t]
                                               << " breaks the layout (" << n_sel << " ascending visible blocks, then -1)";
      }
      if (gi[n_sel - 1] != own)
        return ::testing::AssertionFailure() << where.str() << ": local block " << own << " not selected";
      std::vector<int32_t> gs(gi, gi + n_sel), cs(ci, ci + n_sel);
      const double tol = score_tol(c, row, kmax);
      const bool same = gs == cs;
      if (!same) {
        if (exact)
          return ::testing::AssertionFailure() << where.str() << ": selection differs from the CPU where ties are exact";
        // Judge by the CPU's block scores: every block only the GPU chose must be within the
        // rounding tolerance of every block only the CPU chose.
        if (ref.bs.empty()) return ::testing::AssertionFailure() << where.str() << ": selection differs";
        const float* m = &ref.bs[row * nb];
        for (int32_t a : gs)
          if (!std::binary_search(cs.begin(), cs.end(), a))
            for (int32_t b : cs)
              if (!std::binary_search(gs.begin(), gs.end(), b) && !no_worse(m[a], a, m[b], b, tol))
                return ::testing::AssertionFailure()
                       << where.str() << ": GPU chose block " << a << " (score " << m[a] << ") over block " << b
                       << " (score " << m[b] << "), beyond the tolerance " << tol;
        ++near;
      }
      if (!g.bs.empty()) {
        for (int64_t b = 0; b < nb; ++b) {
          const float gv = g.bs[row * nb + b], cv = ref.bs[row * nb + b];
          if (std::isnan(cv) || std::isinf(cv)) {
            if (!(std::isnan(cv) ? std::isnan(gv) : gv == cv))
              return ::testing::AssertionFailure()
                     << where.str() << ": block_scores[" << b << "] = " << gv << ", expected " << cv;
            continue;
          }
          const double err = std::abs(double(gv) - double(cv)), lim = tol + std::ldexp(std::abs(double(cv)), -20);
          worst_bs = std::max(worst_bs, err / lim);
          if (!(err <= lim))
            return ::testing::AssertionFailure() << where.str() << ": block_scores[" << b << "] = " << gv
                                                 << ", expected " << cv << " (tolerance " << lim << ")";
        }
      }
      if (!g.lse.empty()) {
        const double want = same ? double(ref.lse[row]) : lse_of(c, ri, i, r, gs);
        const double got = g.lse[row];
        if (std::isnan(want) || std::isnan(got)) {
          if (std::isnan(want) != std::isnan(got))
            return ::testing::AssertionFailure() << where.str() << ": index_lse = " << got << ", expected " << want;
          continue;
        }
        const double err = std::abs(got - want), lim = tol + 1e-5 * (1 + std::abs(want));
        worst_lse = std::max(worst_lse, err / lim);
        if (!(err <= lim))
          return ::testing::AssertionFailure()
                 << where.str() << ": index_lse = " << got << ", expected " << want << " (tolerance " << lim << ")";
      }
    }
  if (n_near_ties) *n_near_ties = near;
  // Near-ties must stay rare: a systematic error would show as many "near-ties".
  if (near > std::max<int64_t>(2, n_q * h / 50))
    return ::testing::AssertionFailure() << near << " of " << n_q * h << " rows differ from the CPU selection";
  return ::testing::AssertionSuccess() << "near-ties " << near << ", worst block score error " << worst_bs
                                       << " and lse error " << worst_lse << " of tolerance";
}

// Full comparison with every output requested.
::testing::AssertionResult check_case(const Case& c, bool exact = false) {
  try {
    Out ref = run_cpu(c, true, true);
    Out g = run_gpu(c, true, true);
    return compare(c, g, ref, exact);
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw: " << e.what();
  }
}

TEST(CudaIndexTopk, SingleSequenceLengths) {
  REQUIRE_GPU();
  for (int32_t len : {1, 127, 128, 129, 1023, 4097}) {
    Case c = make_self(100 + len, {len}, 4, 128, 128, 16);
    c.pass_cu = false;
    EXPECT_TRUE(check_case(c)) << "length " << len;
  }
}

TEST(CudaIndexTopk, EveryConfiguration) {
  REQUIRE_GPU();
  // h_kv = 3 splits tokens across CTA row tiles (256 rows is not a multiple of 3).
  for (int64_t d : {64, 128})
    for (int64_t bk : {64, 128})
      for (int64_t topk : {1, 16, 32}) {
        Case c = make_self(7 + d + bk + topk, {2100}, 3, d, bk, topk);
        EXPECT_TRUE(check_case(c)) << "d_idx " << d << ", bk " << bk << ", topk " << topk;
      }
}

TEST(CudaIndexTopk, VarlenBatchTinyAndLong) {
  REQUIRE_GPU();
  // Several sequences per CTA row tile, an empty sequence, and ones longer than a tile.
  Case c = make_self(21, {1, 300, 5, 0, 1000, 129, 64, 2, 700, 3}, 4, 128, 128, 16);
  EXPECT_TRUE(check_case(c));
  Case c64 = make_self(22, {77, 1, 513, 1200, 9}, 2, 64, 64, 8);
  EXPECT_TRUE(check_case(c64));
}

TEST(CudaIndexTopk, ChunkedQueriesBottomRight) {
  REQUIRE_GPU();
  // Chunks of longer sequences, one of them a single decode query.
  Case c = make_case(31, {100, 1, 257}, {900, 300, 1500}, 4, 128, 128, 16);
  EXPECT_TRUE(check_case(c));
  Case one = make_case(32, {40}, {2000}, 4, 128, 64, 32);
  one.pass_cu = true;
  EXPECT_TRUE(check_case(one));
}

TEST(CudaIndexTopk, ExplicitPositions) {
  REQUIRE_GPU();
  Case c = make_case(41, {50, 70}, {800, 1300}, 4, 128, 128, 16);
  std::mt19937_64 rng(41);
  for (int64_t i = 0; i < c.n_q(); ++i) {
    const int32_t len = i < 50 ? 800 : 1300;
    c.q_pos.push_back(int32_t(rng() % uint64_t(len)));  // unsorted, zig-zag-like
  }
  EXPECT_TRUE(check_case(c));
}

TEST(CudaIndexTopk, FewerVisibleBlocksThanTopk) {
  REQUIRE_GPU();
  Case c = make_self(51, {300}, 4, 128, 64, 16);  // at most 5 blocks, fewer than topk
  EXPECT_TRUE(check_case(c, /*exact=*/true));
  Case d = make_self(52, {200, 129}, 2, 64, 128, 32);
  EXPECT_TRUE(check_case(d, /*exact=*/true));
}

TEST(CudaIndexTopk, ExactTiesBreakTowardLowerBlock) {
  REQUIRE_GPU();
  for (int64_t bk : {64, 128}) {
    // Every block a copy of block 0: all full blocks tie bitwise, so the selection is forced.
    Case c = make_self(61 + bk, {1500}, 4, 128, bk, 16);
    for (int64_t j = bk; j < c.n_k(); ++j)
      for (int64_t e = 0; e < c.d; ++e) c.k[j * c.d + e] = c.k[(j % bk) * c.d + e];
    EXPECT_TRUE(check_case(c, /*exact=*/true)) << "bk " << bk;
    // Blocks b % 3 != 1 copy block 0, the others are weak (scaled by 1/8, exact in bf16): a row
    // with at least topk - 1 strong blocks before its own has a forced selection.
    Case m = make_self(71 + bk, {2200}, 4, 128, bk, 8);
    for (int64_t j = bk; j < m.n_k(); ++j)
      for (int64_t e = 0; e < m.d; ++e)
        m.k[j * m.d + e] = (j / bk) % 3 != 1 ? m.k[(j % bk) * m.d + e] : m.k[j * m.d + e] / 8;
    EXPECT_TRUE(check_case(m, /*exact=*/false)) << "bk " << bk;
    Out ref = run_cpu(m, true, true), g = run_gpu(m, true, true);
    const RowsInfo ri = rows_info(m);
    for (int64_t i = 0; i < m.n_q(); ++i) {
      const int64_t own = ri.pos[i] / bk;
      int64_t strong = 0;
      for (int64_t b = 0; b < own; ++b) strong += b % 3 != 1;
      if (strong < m.topk - 1) continue;
      for (int64_t t = 0; t < m.h_kv * m.topk; ++t)
        ASSERT_EQ(g.idx[i * m.h_kv * m.topk + t], ref.idx[i * m.h_kv * m.topk + t]) << "token " << i << ", bk " << bk;
    }
  }
}

TEST(CudaIndexTopk, NaNScoresRankLast) {
  REQUIRE_GPU();
  Case c = make_self(81, {900}, 2, 128, 64, 4);
  const double nan = std::nan("");
  for (int64_t j = 2 * 64; j < 3 * 64; ++j) c.k[j * c.d + 5] = nan;  // block 2: all NaN
  c.k[(4 * 64 + 7) * c.d] = nan;                                      // block 4: one NaN key
  for (int64_t e = 0; e < c.d; ++e) c.q[(300 * 2 + 1) * c.d + e] = nan;  // a row with NaN everywhere
  EXPECT_TRUE(check_case(c));
}

TEST(CudaIndexTopk, StridedAndUnalignedOperands) {
  REQUIRE_GPU();
  // Padded 16-byte-aligned strides: vector Q loads and TMA on the user's k_idx.
  Case a = make_self(91, {600, 333}, 4, 128, 128, 16);
  a.q_stride_head = 128 + 8;
  a.q_stride_tok = 4 * 136 + 24;
  a.k_stride = 128 + 16;
  EXPECT_TRUE(check_case(a));
  // Odd strides and offsets: scalar Q loads and the repacked K path.
  Case b = make_self(92, {500, 77}, 3, 64, 64, 16);
  b.q_stride_head = 64 + 3;
  b.q_stride_tok = 3 * 67 + 1;
  b.k_stride = 64 + 3;
  b.q_offset = 1;
  b.k_offset = 1;
  EXPECT_TRUE(check_case(b));
}

TEST(CudaIndexTopk, ManyHeadsAndOptionalOutputs) {
  REQUIRE_GPU();
  // h_kv above the 256-row tile: one token spans two CTAs.
  Case c = make_self(95, {130}, 300, 64, 64, 4);
  EXPECT_TRUE(check_case(c));
  // Without block_scores and lse (the other kernel variant) the selection is bitwise the same.
  Case d = make_self(96, {1100, 400}, 4, 128, 128, 16);
  Out full = run_gpu(d, true, true), bare = run_gpu(d, false, false), only_lse = run_gpu(d, false, true);
  EXPECT_EQ(full.idx, bare.idx);
  EXPECT_EQ(full.idx, only_lse.idx);
  EXPECT_TRUE(bitwise_equal(only_lse.lse, full.lse));
}

TEST(CudaIndexTopk, TwentyRunsBitwiseIdentical) {
  REQUIRE_GPU();
  Case c = make_self(97, {3000, 17, 900}, 4, 128, 128, 16);
  bool deterministic = true;
  Out o = run_gpu(c, true, true, 20, &deterministic);
  EXPECT_TRUE(deterministic);
  Out ref = run_cpu(c, true, true);
  EXPECT_TRUE(compare(c, o, ref, false));
}

TEST(CudaIndexTopk, GarbageVarlenStaysInBounds) {
  REQUIRE_GPU();
  // Contents the host cannot check on this backend: decreasing and out-of-range offsets and
  // positions. The results are meaningless but every access must stay inside the tensors (run
  // under compute-sanitizer) and every written index must be -1 or a block of some sequence.
  Case c = make_case(98, {100, 100, 100}, {200, 100, 300}, 2, 64, 64, 8);
  Storage s = store(c);
  std::vector<int32_t> cu_q = {0, 250, -40, 300}, cu_k = {0, 9999, 50, 600};
  std::vector<int32_t> q_pos(size_t(c.n_q()));
  for (size_t i = 0; i < q_pos.size(); ++i) q_pos[i] = int32_t(i * 7919 % 1300) - 200;
  DevBuf<bf16> q(s.q), k(s.k);
  DevBuf<int32_t> dcu_q(cu_q), dcu_k(cu_k), dq_pos(q_pos), idx(size_t(c.n_q() * c.h_kv * c.topk));
  DevBuf<float> bs(size_t(c.n_q() * c.h_kv * 4)), lse(size_t(c.n_q() * c.h_kv));
  for (bool with_pos : {false, true}) {
    IndexTopkParams p = params_of(c);
    p.seq.cu_seqlens_q = dcu_q.ptr;
    p.seq.cu_seqlens_k = dcu_k.ptr;
    p.seq.q_pos = with_pos ? dq_pos.ptr : nullptr;
    p.q_idx = q.ptr;
    p.k_idx = k.ptr;
    p.topk_idx = idx.ptr;
    p.block_scores = bs.ptr;
    p.n_blocks = 4;  // fewer than the longest sequence has: columns past it are not written
    p.index_lse = lse.ptr;
    Exec ex;
    ex.backend = Backend::cuda;
    idx.poison(kPoisonByte);
    index_topk(p, ex);
    cuda_check(cudaDeviceSynchronize(), "index_topk kernel");
    for (int32_t b : idx.get()) EXPECT_TRUE(b >= -1 && b < int32_t((c.n_k() + c.bk - 1) / c.bk)) << b;
  }
}

#endif  // MSA_WITH_CUDA

}  // namespace
}  // namespace msa::test
