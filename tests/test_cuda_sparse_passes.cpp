// Tests of the query passes of the CUDA sparse attention forward (src/cuda/sparse_fwd.cu): the
// forward run in passes of a few query rows (forced through the internal pass_queries option) must
// give the same bits as the public call, on varlen batches with chunked queries, explicit
// positions, misaligned q (repacked per pass), hot blocks split into many work items and garbage
// selection entries; and the workspace must stay bounded for a million-token prompt.
// GPU tests skip with a message when no device is visible.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

#ifdef MSA_WITH_CUDA
#include "cuda/host.h"
#include "cuda/sparse_fwd.h"
#endif

namespace msa::test {
namespace {

#ifndef MSA_WITH_CUDA

TEST(CudaSparsePasses, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

// One problem on the device: bf16 q (optionally at an odd offset and head stride, which makes the
// forward repack q per pass), k, v, a selection and the varlen arrays.
struct Problem {
  int64_t h_q, h_kv, d, bk, topk;
  std::vector<int32_t> cu_q, cu_k, q_pos;  // q_pos empty: bottom-right aligned
  int64_t q_off = 0, q_pad_head = 0;
  std::vector<uint16_t> q, k, v;
  std::vector<int32_t> idx;
  int64_t n_q() const { return cu_q.back(); }
  int64_t n_k() const { return cu_k.back(); }
  int64_t stride_q_head() const { return d + q_pad_head; }
  int64_t stride_q_tok() const { return h_q * stride_q_head(); }
};

std::vector<uint16_t> random_bf16(std::mt19937_64& rng, size_t n, double sigma) {
  std::normal_distribution<double> dist(0.0, sigma);
  std::vector<uint16_t> out(n);
  for (auto& x : out) x = float_to_bf16(float(dist(rng))).bits;
  return out;
}

// Visible blocks per (query, group): block `hot` in every row that sees it, the own block mostly,
// then a random number of random others in random order; every 9th row carries a garbage entry
// (out of range, negative or invisible), which the kernels must skip the same way in every pass.
Problem make_problem(uint64_t seed, const std::vector<int32_t>& lens_q, const std::vector<int32_t>& lens_k,
                     int64_t h_q, int64_t h_kv, int64_t d, int64_t bk, int64_t topk, bool explicit_pos) {
  std::mt19937_64 rng(seed);
  Problem P{h_q, h_kv, d, bk, topk, cu_from_lengths(lens_q), cu_from_lengths(lens_k), {}, 0, 0, {}, {}, {}, {}};
  const int64_t n_q = P.n_q();
  std::vector<int64_t> pos(n_q);
  for (size_t b = 0; b + 1 < P.cu_q.size(); ++b) {
    const int64_t len_q = P.cu_q[b + 1] - P.cu_q[b], len_k = P.cu_k[b + 1] - P.cu_k[b];
    for (int64_t t = 0; t < len_q; ++t)
      pos[P.cu_q[b] + t] = explicit_pos ? int64_t(rng() % uint64_t(std::max<int64_t>(len_k, 1))) : len_k - len_q + t;
  }
  if (explicit_pos) P.q_pos.assign(pos.begin(), pos.end());
  P.k = random_bf16(rng, P.n_k() * h_kv * d, 1.0);
  P.v = random_bf16(rng, P.n_k() * h_kv * d, 1.0);
  P.idx.assign(n_q * h_kv * topk, -1);
  const int32_t hot = 0;
  for (int64_t i = 0; i < n_q; ++i) {
    const int32_t own = int32_t(pos[i] / bk);
    for (int64_t r = 0; r < h_kv; ++r) {
      std::vector<int32_t> row = {hot};
      if (own != hot && rng() % 8 != 0) row.push_back(own);
      std::vector<int32_t> cand;
      for (int32_t b = 1; b < own; ++b) cand.push_back(b);
      std::shuffle(cand.begin(), cand.end(), rng);
      const int64_t room = std::min<int64_t>(topk - int64_t(row.size()), int64_t(cand.size()));
      const int64_t c = room > 0 ? int64_t(rng() % uint64_t(room + 1)) : 0;
      row.insert(row.end(), cand.begin(), cand.begin() + c);
      std::shuffle(row.begin(), row.end(), rng);
      const int64_t row_id = i * h_kv + r;
      std::copy(row.begin(), row.end(), P.idx.begin() + row_id * topk);
      if (row_id % 9 == 0) {
        const int32_t garbage[] = {own + 1, -5, 1 << 30};
        P.idx[row_id * topk + (row_id / 9) % topk] = garbage[(row_id / 9) % 3];
      }
    }
  }
  return P;
}

void fill_q(Problem& P, uint64_t seed) {
  std::mt19937_64 rng(seed);
  P.q.assign(size_t(P.q_off + std::max<int64_t>(P.n_q(), 1) * P.stride_q_tok()), 0x7fc0);  // gaps hold NaN
  std::normal_distribution<double> dist(0.0, 2.0);
  for (int64_t t = 0; t < P.n_q(); ++t)
    for (int64_t h = 0; h < P.h_q; ++h)
      for (int64_t c = 0; c < P.d; ++c)
        P.q[P.q_off + t * P.stride_q_tok() + h * P.stride_q_head() + c] = float_to_bf16(float(dist(rng))).bits;
}

struct Out {
  std::vector<uint16_t> o;
  std::vector<float> lse;
};

// pass_queries < 0: the public call (whatever the library picks); otherwise the internal entry
// with that pass size (0: the default), work items of at most chunk queries (0: default) and query
// bands of band rows (0: default, -1: one band); poisoned_workspace: a caller workspace filled with
// 0xff bytes (NaN partials) before the call.
Out run(const Problem& P, int64_t pass_queries, int64_t chunk = 0, size_t max_workspace_bytes = 0, int64_t band = 0,
        bool poisoned_workspace = false) {
  DevBuf<uint16_t> q(P.q), k(P.k), v(P.v), o(size_t(P.n_q() * P.h_q * P.d));
  DevBuf<float> lse(size_t(P.n_q() * P.h_q));
  DevBuf<int32_t> idx(P.idx), cu_q(P.cu_q), cu_k(P.cu_k), q_pos(P.q_pos);
  o.poison(0xff);  // NaN: an unwritten output cannot match
  lse.poison(0xff);
  AttentionParams a;
  a.seq.n_q = P.n_q();
  a.seq.n_k = P.n_k();
  a.seq.batch = int64_t(P.cu_q.size()) - 1;
  a.seq.cu_seqlens_q = cu_q.ptr;
  a.seq.cu_seqlens_k = cu_k.ptr;
  a.seq.q_pos = P.q_pos.empty() ? nullptr : q_pos.ptr;
  a.h_q = P.h_q;
  a.h_kv = P.h_kv;
  a.d = P.d;
  a.bk = P.bk;
  a.topk = P.topk;
  a.dtype = DType::bf16;
  a.q = q.ptr + P.q_off;
  a.stride_q_head = P.stride_q_head();
  a.stride_q_tok = P.stride_q_tok();
  a.k = k.ptr;
  a.v = v.ptr;
  a.o = o.ptr;
  a.lse = lse.ptr;
  a.topk_idx = idx.ptr;
  if (pass_queries < 0) {
    Exec ex;
    ex.backend = Backend::cuda;
    ex.max_workspace_bytes = max_workspace_bytes;
    sparse_attention_forward(a, ex);
  } else {
    cuda::SparseFwdOptions opt;
    opt.pass_queries = pass_queries;
    opt.chunk_queries = chunk;
    opt.band_queries = band;
    if (poisoned_workspace) {
      DevBuf<uint8_t> ws(cuda::sparse_fwd_workspace_bytes(a, opt));
      ws.poison(0xff);
      opt.workspace = ws.ptr;
      opt.workspace_bytes = ws.n;
      cuda::run_sparse_attention_forward(a, nullptr, opt);
      cuda_check(cudaDeviceSynchronize(), "sparse forward");
    } else {
      cuda::run_sparse_attention_forward(a, nullptr, opt);
    }
  }
  cuda_check(cudaDeviceSynchronize(), "sparse forward");
  return {o.get(), lse.get()};
}

::testing::AssertionResult same_bits(const Out& got, const Out& ref, const std::string& what) {
  for (size_t e = 0; e < ref.o.size(); ++e)
    if (got.o[e] != ref.o[e])
      return ::testing::AssertionFailure() << what << ": o differs at element " << e << " (bits " << got.o[e]
                                           << " vs " << ref.o[e] << ")";
  if (std::memcmp(got.lse.data(), ref.lse.data(), ref.lse.size() * 4) != 0) {
    size_t e = 0;
    while (std::memcmp(&got.lse[e], &ref.lse[e], 4) == 0) ++e;
    return ::testing::AssertionFailure() << what << ": lse differs at row " << e << " (" << got.lse[e] << " vs "
                                         << ref.lse[e] << ")";
  }
  return ::testing::AssertionSuccess();
}

// The reference must itself be a real result: every o finite, every lse finite or -inf (a row
// whose entries are all skipped), and some rows attended.
::testing::AssertionResult written(const Out& ref) {
  for (size_t e = 0; e < ref.o.size(); ++e)
    if (!std::isfinite(bf16_to_float(bf16{ref.o[e]}))) return ::testing::AssertionFailure() << "o[" << e << "] unwritten";
  int64_t finite = 0;
  for (float x : ref.lse) {
    if (std::isnan(x) || x == INFINITY) return ::testing::AssertionFailure() << "lse unwritten";
    finite += std::isfinite(x) ? 1 : 0;
  }
  if (finite == 0) return ::testing::AssertionFailure() << "no row attended anything";
  return ::testing::AssertionSuccess();
}

void expect_passes_match(const Problem& P, std::initializer_list<int64_t> passes, int64_t chunk = 0) {
  const Out ref = run(P, -1);
  ASSERT_TRUE(written(ref));
  // The default pass (one pass at these sizes) with the same work items as the forced ones.
  const Out one = run(P, 0, chunk);
  EXPECT_TRUE(same_bits(one, ref, "one pass, chunk " + std::to_string(chunk)));
  for (int64_t pass : passes) {
    const Out got = run(P, pass, chunk);
    EXPECT_TRUE(same_bits(got, ref, "pass " + std::to_string(pass) + ", chunk " + std::to_string(chunk)));
  }
}

TEST(CudaSparsePasses, VarlenChunkedQueriesBitwiseAsOnePass) {
  REQUIRE_GPU();
  // Queries are the tails of longer key sequences (chunked prefill, decode with one query), with an
  // empty sequence; pass boundaries fall inside sequences and between them.
  Problem P = make_problem(11, {100, 0, 37, 1, 300}, {1000, 5, 37, 513, 300}, 8, 2, 128, 64, 8, false);
  fill_q(P, 12);
  expect_passes_match(P, {1, 3, 64, 129, 437, 1000});
  // Work items of 8 queries: the hot block becomes many full items, so the heavy-first order of
  // the groups differs from pass to pass; the bits must not.
  expect_passes_match(P, {1, 50, 129}, 8);
}

TEST(CudaSparsePasses, ExplicitPositionsAndLargeGroupBitwiseAsOnePass) {
  REQUIRE_GPU();
  Problem P = make_problem(21, {250, 90}, {900, 300}, 16, 1, 64, 128, 4, true);
  fill_q(P, 22);
  expect_passes_match(P, {1, 5, 17, 256});
}

TEST(CudaSparsePasses, MisalignedQRepackedPerPassBitwiseAsOnePass) {
  REQUIRE_GPU();
  Problem P = make_problem(31, {200, 130}, {200, 130}, 8, 2, 128, 128, 4, false);
  P.q_off = 1;
  P.q_pad_head = 3;
  fill_q(P, 32);
  expect_passes_match(P, {7, 100});
}

// The work order by query bands (a band's items all run before the next band's) moves speed only:
// bands of 1 .. 512 rows, with passes that cut bands short and work items of 8 queries (many full
// items per hot group, so the heavy-first order inside each band changes too).
TEST(CudaSparsePasses, QueryBandsBitwiseAsOneBand) {
  REQUIRE_GPU();
  Problem P = make_problem(41, {100, 0, 37, 1, 300}, {1000, 5, 37, 513, 300}, 8, 2, 128, 64, 8, false);
  fill_q(P, 42);
  const Out ref = run(P, -1);
  ASSERT_TRUE(written(ref));
  for (int64_t band : {int64_t(-1), int64_t(1), int64_t(2), int64_t(4), int64_t(16), int64_t(64), int64_t(512)})
    for (int64_t pass : {int64_t(0), int64_t(129)})
      for (int64_t chunk : {int64_t(0), int64_t(8)})
        EXPECT_TRUE(same_bits(run(P, pass, chunk, 0, band), ref,
                              "band " + std::to_string(band) + ", pass " + std::to_string(pass) + ", chunk " +
                                  std::to_string(chunk)));
  // g = 16 (4 queries per tile), explicit positions.
  Problem P16 = make_problem(43, {250, 90}, {900, 300}, 16, 1, 64, 128, 4, true);
  fill_q(P16, 44);
  const Out ref16 = run(P16, -1);
  ASSERT_TRUE(written(ref16));
  for (int64_t band : {int64_t(1), int64_t(8), int64_t(32)})
    EXPECT_TRUE(same_bits(run(P16, 0, 0, 0, band), ref16, "g 16, band " + std::to_string(band)));
}

// The band each pass of one long sequence picks for itself (from the key blocks its queries see):
// at h_q = 16, h_kv = 1, d = 128 the plan's band is 8192 queries; with topk = 4, passes of 16384
// double it in the second pass (256 blocks: 8192 x 4 < 256 x 192), and passes of 4096 halve it twice
// in the first (32 blocks) and once in the second (64 blocks); a pass of 32768 queries at the end of
// 65536 keys (512 blocks) doubles it twice. Every pick only orders the work.
TEST(CudaSparsePasses, AdaptiveBandsBitwiseAsOneBand) {
  REQUIRE_GPU();
  Problem P = make_problem(45, {32768}, {32768}, 16, 1, 128, 128, 4, false);
  fill_q(P, 46);
  const Out ref = run(P, -1);
  ASSERT_TRUE(written(ref));
  for (int64_t pass : {int64_t(16384), int64_t(4096)}) {
    EXPECT_TRUE(same_bits(run(P, pass), ref, "adaptive bands, pass " + std::to_string(pass)));
    EXPECT_TRUE(same_bits(run(P, pass, 0, 0, -1), ref, "one band, pass " + std::to_string(pass)));
  }
  Problem C = make_problem(47, {32768}, {65536}, 16, 1, 128, 128, 4, false);
  fill_q(C, 48);
  const Out ref_c = run(C, -1);
  ASSERT_TRUE(written(ref_c));
  EXPECT_TRUE(same_bits(run(C, 32768), ref_c, "adaptive bands, one pass of 32768 queries"));
  EXPECT_TRUE(same_bits(run(C, 32768, 0, 0, -1), ref_c, "one band, one pass of 32768 queries"));
}

// The local pass merges a unit as soon as phase 1 has finished its query bands, while phase 1 still
// runs other items (with fewer items than SMs, from the start). Partials read before they are
// written would be the 0xff poison (NaN) of a fresh caller workspace, not the previous call's values.
TEST(CudaSparsePasses, PoisonedWorkspaceBitwiseAsPublicCall) {
  REQUIRE_GPU();
  Problem P = make_problem(51, {100, 0, 37, 1, 300}, {1000, 5, 37, 513, 300}, 8, 2, 128, 64, 8, false);
  fill_q(P, 52);
  const Out ref = run(P, -1);
  ASSERT_TRUE(written(ref));
  for (int rep = 0; rep < 3; ++rep)
    for (int64_t band : {int64_t(-1), int64_t(1), int64_t(8), int64_t(64)})
      for (int64_t pass : {int64_t(0), int64_t(129)})
        EXPECT_TRUE(same_bits(run(P, pass, 8, 0, band, true), ref,
                              "poisoned workspace, band " + std::to_string(band) + ", pass " + std::to_string(pass)));
}

TEST(CudaSparsePasses, WorkspaceBoundedForAMillionTokens) {
  REQUIRE_GPU();
  // The M3 shape: the partials alone would be n * h_q * topk * (2 d + 4) = 279 GB at 1M tokens
  // without passes; with them the workspace is one pass's, the same at 128K and at 1M.
  AttentionParams a;
  a.h_q = 64;
  a.h_kv = 4;
  a.d = 128;
  a.bk = 128;
  a.topk = 16;
  a.dtype = DType::bf16;
  auto bytes = [&](int64_t n, int64_t pass) {
    a.seq.n_q = a.seq.n_k = n;
    cuda::SparseFwdOptions opt;
    opt.pass_queries = pass;
    return double(cuda::sparse_fwd_workspace_bytes(a, opt));
  };
  const double m1 = bytes(int64_t(1) << 20, 0), k128 = bytes(int64_t(1) << 17, 0);
  const double per_query = 64.0 * 16 * (2 * 128 + 4);
  EXPECT_LT(m1, 32768 * per_query + 260e6) << "workspace at 1M tokens: " << m1 / 1e9 << " GB";
  EXPECT_GT(m1, 32768 * per_query) << "the default pass should be 32768 queries at this shape";
  // Only the per-group counters (h_kv * n_k, in each of the two schedule buffers that alternate
  // between passes) grow with the keys.
  EXPECT_LT(m1 - k128, 2 * (4.0 * 4 * (int64_t(1) << 20)) + 1e6);
  EXPECT_LT(bytes(int64_t(1) << 20, 1), 1e8);
  EXPECT_LT(bytes(4096, 0), 4096 * per_query + 16e6);
}

// Exec::max_workspace_bytes picks the largest pass whose workspace fits; the bits do not change,
// and a budget below one query's needs is a clear error.
TEST(CudaSparsePasses, WorkspaceBudgetPicksThePassSize) {
  REQUIRE_GPU();
  Problem P = make_problem(41, {300, 0, 211}, {700, 5, 211}, 16, 2, 128, 64, 8, false);
  fill_q(P, 42);
  const Out ref = run(P, -1);
  ASSERT_TRUE(written(ref));
  AttentionParams a;
  a.seq.n_q = P.n_q();
  a.seq.n_k = P.n_k();
  a.h_q = P.h_q;
  a.h_kv = P.h_kv;
  a.d = P.d;
  a.bk = P.bk;
  a.topk = P.topk;
  a.dtype = DType::bf16;
  cuda::SparseFwdOptions opt;
  opt.pass_queries = 1;
  const size_t one = cuda::sparse_fwd_workspace_bytes(a, opt);
  opt.pass_queries = 0;
  const size_t all = cuda::sparse_fwd_workspace_bytes(a, opt);  // one pass at this size
  ASSERT_GT(all, one);
  for (size_t budget : {one, one + (all - one) / 7, one + (all - one) / 2, all, 4 * all}) {
    opt.max_workspace_bytes = budget;
    EXPECT_LE(cuda::sparse_fwd_workspace_bytes(a, opt), budget) << "budget " << budget;
    EXPECT_TRUE(same_bits(run(P, -1, 0, budget), ref, "budget " + std::to_string(budget)));
  }
  opt.max_workspace_bytes = one - 1;
  EXPECT_THROW(cuda::sparse_fwd_workspace_bytes(a, opt), Error);
  EXPECT_THROW(run(P, -1, 0, one - 1), Error);
}

// The pass-size search behind Exec::max_workspace_bytes (host only): the largest pass whose plan fits,
// against a brute-force scan, for workspaces growing with the pass (linearly, and with a fixed part),
// and the error below one query.
TEST(CudaSparsePasses, LargestFittingPlanSearch) {
  struct FakePlan {
    int64_t pass;
    size_t bytes;
  };
  for (size_t fixed : {size_t(0), size_t(1000)})
    for (size_t per : {size_t(1), size_t(7), size_t(260)})
      for (int64_t max_pass : {1, 2, 3, 100, 16385})
        for (size_t limit : {fixed + per, fixed + 5 * per + 3, fixed + 99 * per, fixed + per * 20000}) {
          auto plan = [&](int64_t pass) { return FakePlan{pass, fixed + per * size_t(pass)}; };
          const FakePlan got = cuda::largest_fitting_plan("f: ", limit, max_pass, plan,
                                                          [](const FakePlan& f) { return f.bytes; });
          int64_t want = 1;
          for (int64_t q = 1; q <= max_pass; ++q)
            if (plan(q).bytes <= limit) want = q;
          EXPECT_EQ(got.pass, want) << "fixed " << fixed << " per " << per << " max " << max_pass << " limit " << limit;
        }
  auto plan = [](int64_t pass) { return FakePlan{pass, 100 + size_t(pass)}; };
  EXPECT_TRUE(throws_error(
      [&] { cuda::largest_fitting_plan("f: ", 100, 10, plan, [](const FakePlan& f) { return f.bytes; }); },
      {"f: max_workspace_bytes = 100, expected at least 101 (one query per pass)"}));
}

#endif  // MSA_WITH_CUDA

}  // namespace
}  // namespace msa::test

