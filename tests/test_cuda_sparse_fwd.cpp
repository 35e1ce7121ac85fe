// Tests of msa::sparse_attention_forward on the CUDA backend against the CPU backend on the same
// bf16 inputs: awkward lengths (1 .. 4097), every (d, g, bk), varlen batches with empty and tiny
// sequences, chunked queries (bottom-right and explicit positions), rows with fewer than topk or
// no valid entries, a sink block chosen by every query (its group splits into several work
// items) next to a block chosen by none, strided and misaligned operands, garbage selections and
// varlen contents (memory safety), 20 bitwise-identical runs, the combine-kernel path that the
// local pass replaced (an internal option), and shape errors.
// GPU tests skip with a message when no device is visible.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

#ifdef MSA_WITH_CUDA
#include "cuda/sparse_fwd.h"
#endif

namespace msa::test {
namespace {

TEST(CudaSparseFwd, BadArgumentsThrowBeforeLaunch) {
  REQUIRE_CUDA_BUILD();
  // Pointers are never dereferenced on the host for the cuda backend: dummies are enough.
  int32_t dummy[4] = {0, 0, 0, 0};
  AttentionParams p;
  p.seq.n_q = p.seq.n_k = 8;
  p.h_q = 4;
  p.h_kv = 2;
  p.d = 128;
  p.bk = 128;
  p.topk = 4;
  p.q = p.k = p.v = dummy;
  p.o = dummy;
  p.lse = reinterpret_cast<float*>(dummy);
  p.topk_idx = dummy;
  Exec ex;
  ex.backend = Backend::cuda;
  auto with = [&](auto change, std::initializer_list<const char*> frags) {
    AttentionParams a = p;
    change(a);
    return throws_error([&] { sparse_attention_forward(a, ex); }, frags);
  };
  EXPECT_TRUE(with([](AttentionParams& a) { a.d = 32; }, {"msa::sparse_attention_forward", "d = 32"}));
  EXPECT_TRUE(with([](AttentionParams& a) { a.bk = 32; }, {"bk = 32"}));
  EXPECT_TRUE(with([](AttentionParams& a) { a.h_q = 6, a.h_kv = 2; }, {"h_q / h_kv = 3"}));
  EXPECT_TRUE(with([](AttentionParams& a) { a.dtype = DType::f32; }, {"bfloat16"}));
  EXPECT_TRUE(with([](AttentionParams& a) { a.topk = 33; }, {"topk = 33"}));
  EXPECT_TRUE(with([](AttentionParams& a) { a.topk_idx = nullptr; }, {"topk_idx"}));
  EXPECT_TRUE(with([](AttentionParams& a) { a.seq.batch = 2; }, {"cu_seqlens_q"}));
  EXPECT_TRUE(with([](AttentionParams& a) { a.seq.n_k = 4; }, {"cu_seqlens_k"}));
}

#ifndef MSA_WITH_CUDA

TEST(CudaSparseFwd, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

constexpr double kU = 1.0 / 256;  // bf16 unit roundoff, 2^-8

// One problem: lengths, heads, the selection and the logical data (doubles exact in bf16).
struct Problem {
  int64_t h_q = 4, h_kv = 2, d = 128, bk = 128, topk = 8;
  std::vector<int32_t> cu_q, cu_k;  // [batch+1]
  std::vector<int32_t> q_pos;       // [n_q]; empty: bottom-right aligned
  bool pass_cu = true;              // false: one sequence, null cu_seqlens
  std::vector<double> q, k, v;      // [n_q, h_q, d], [n_k, h_kv, d] x2
  std::vector<int32_t> idx;         // [n_q, h_kv, topk]

  int64_t n_q() const { return cu_q.back(); }
  int64_t n_k() const { return cu_k.back(); }
  int64_t batch() const { return int64_t(cu_q.size()) - 1; }
  int64_t g() const { return h_q / h_kv; }
  int64_t seq(int64_t i) const {
    int64_t b = 0;
    while (cu_q[b + 1] <= i) ++b;
    return b;
  }
  int64_t pos(int64_t i) const {
    if (!q_pos.empty()) return q_pos[i];
    const int64_t b = seq(i);
    return (cu_k[b + 1] - cu_k[b]) - (cu_q[b + 1] - cu_q[b]) + (i - cu_q[b]);
  }
};

// q a little larger than k so that many softmax rows are peaked (then o is not a tiny average of
// v and the bf16 tolerances below, relative to the row's |o|, have teeth).
Problem make_problem(uint64_t seed, const std::vector<int32_t>& lens_q, const std::vector<int32_t>& lens_k, int64_t h_q,
                     int64_t h_kv, int64_t d, int64_t bk, int64_t topk) {
  std::mt19937_64 rng(seed);
  Problem P;
  P.h_q = h_q;
  P.h_kv = h_kv;
  P.d = d;
  P.bk = bk;
  P.topk = topk;
  P.cu_q = cu_from_lengths(lens_q);
  P.cu_k = cu_from_lengths(lens_k);
  P.q = randn(rng, P.n_q() * h_q * d, 2.0, DType::bf16);
  P.k = randn(rng, P.n_k() * h_kv * d, 1.0, DType::bf16);
  P.v = randn(rng, P.n_k() * h_kv * d, 1.0, DType::bf16);
  return P;
}

// Random visible blocks per (query, group): the local block most of the time, block `every` in
// every row that sees it, block `none` in no row; `fill` takes as many as fit, otherwise a random
// count (so many rows hold fewer than topk); every `empty_every`-th row is all padding. Valid
// entries in random order, then -1.
void select_random(Problem& P, uint64_t seed, bool fill, int32_t every = -1, int32_t none = -1, int empty_every = 0) {
  std::mt19937_64 rng(seed);
  P.idx.assign(P.n_q() * P.h_kv * P.topk, -1);
  std::bernoulli_distribution take_own(0.85);
  for (int64_t i = 0; i < P.n_q(); ++i) {
    const int32_t own = int32_t(P.pos(i) / P.bk);
    for (int64_t r = 0; r < P.h_kv; ++r) {
      const int64_t row_id = i * P.h_kv + r;
      if (empty_every > 0 && row_id % empty_every == 0) continue;
      std::vector<int32_t> row, cand;
      if (every >= 0 && every <= own) row.push_back(every);
      if (own != every && own != none && take_own(rng) && int64_t(row.size()) < P.topk) row.push_back(own);
      for (int32_t b = 0; b < own; ++b)
        if (b != every && b != none) cand.push_back(b);
      std::shuffle(cand.begin(), cand.end(), rng);
      const int64_t room = std::min<int64_t>(P.topk - int64_t(row.size()), int64_t(cand.size()));
      const int64_t c = fill ? room : std::uniform_int_distribution<int64_t>(0, room)(rng);
      row.insert(row.end(), cand.begin(), cand.begin() + c);
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), P.idx.begin() + row_id * P.topk);
    }
  }
}

// Every visible block of every row (dense causal attention through the sparse path).
void select_all(Problem& P) {
  P.idx.assign(P.n_q() * P.h_kv * P.topk, -1);
  for (int64_t i = 0; i < P.n_q(); ++i)
    for (int64_t r = 0; r < P.h_kv; ++r)
      for (int64_t b = 0; b <= P.pos(i) / P.bk && b < P.topk; ++b) P.idx[(i * P.h_kv + r) * P.topk + b] = int32_t(b);
}

AttentionParams base_params(const Problem& P) {
  AttentionParams a;
  a.seq.n_q = P.n_q();
  a.seq.n_k = P.n_k();
  a.seq.batch = P.batch();
  a.h_q = P.h_q;
  a.h_kv = P.h_kv;
  a.d = P.d;
  a.bk = P.bk;
  a.topk = P.topk;
  a.dtype = DType::bf16;
  return a;
}

// The CPU backend in float32 on the same (bf16-exact) values: o and lse, and o_abs = the same
// attention applied to |v|, i.e. sum_j p_j |v_j| per element, the scale of the bf16 errors.
struct Ref {
  std::vector<double> o, lse, o_abs;
};

Ref cpu_reference(const Problem& P) {
  Ref ref;
  AttentionParams a = base_params(P);
  a.seq.cu_seqlens_q = P.cu_q.data();
  a.seq.cu_seqlens_k = P.cu_k.data();
  a.seq.q_pos = P.q_pos.empty() ? nullptr : P.q_pos.data();
  a.dtype = DType::f32;
  a.topk_idx = P.idx.data();
  std::vector<double> v_abs(P.v.size());
  for (size_t e = 0; e < v_abs.size(); ++e) v_abs[e] = std::abs(P.v[e]);
  Buf q(DType::f32, P.q), k(DType::f32, P.k), v(DType::f32, P.v), va(DType::f32, v_abs);
  for (int pass = 0; pass < 2; ++pass) {
    Buf o(DType::f32, P.n_q() * P.h_q * P.d);
    std::vector<float> lse(P.n_q() * P.h_q);
    a.q = q.data();
    a.k = k.data();
    a.v = pass == 0 ? v.data() : va.data();
    a.o = o.data();
    a.lse = lse.data();
    sparse_attention_forward(a, Exec{});
    if (pass == 0) {
      ref.o = o.to_double();
      ref.lse.assign(lse.begin(), lse.end());
    } else {
      ref.o_abs = o.to_double();
    }
  }
  return ref;
}

// Operand layouts of a GPU call: extra elements per head and per token, and elements before the
// first row (a misaligned base when not a multiple of 8).
struct Layout {
  int64_t q_pad_head = 0, q_pad_tok = 0, q_off = 0;
  int64_t kv_pad_head = 0, kv_pad_tok = 0, kv_off = 0;
  int64_t o_pad_head = 0, o_pad_tok = 0, o_off = 0;
};

struct Out {
  std::vector<double> o, lse;
  std::vector<uint16_t> o_bits;
  std::vector<float> lse_raw;
};

// Scatters a contiguous [n, h, d] tensor into a strided bf16 buffer.
std::vector<uint16_t> to_strided(const std::vector<double>& x, int64_t n, int64_t h, int64_t d, int64_t s_head,
                                 int64_t s_tok, int64_t off) {
  std::vector<uint16_t> out(size_t(off + std::max<int64_t>(n, 1) * s_tok), 0x7fc0);  // gaps hold NaN
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < h; ++e)
      for (int64_t c = 0; c < d; ++c) {
        const bf16 b = float_to_bf16(float(x[(t * h + e) * d + c]));
        out[off + t * s_tok + e * s_head + c] = b.bits;
      }
  return out;
}

// opt: the internal entry with these options instead of the public call.
Out run_gpu(const Problem& P, const Layout& L = {}, cudaStream_t stream = nullptr,
            const cuda::SparseFwdOptions* opt = nullptr) {
  const int64_t n_q = P.n_q(), n_k = P.n_k(), d = P.d;
  const int64_t qh = d + L.q_pad_head, qt = P.h_q * qh + L.q_pad_tok;
  const int64_t kh = d + L.kv_pad_head, kt = P.h_kv * kh + L.kv_pad_tok;
  const int64_t oh = d + L.o_pad_head, ot = P.h_q * oh + L.o_pad_tok;
  DevBuf<uint16_t> q(to_strided(P.q, n_q, P.h_q, d, qh, qt, L.q_off));
  DevBuf<uint16_t> k(to_strided(P.k, n_k, P.h_kv, d, kh, kt, L.kv_off));
  DevBuf<uint16_t> v(to_strided(P.v, n_k, P.h_kv, d, kh, kt, L.kv_off));
  DevBuf<uint16_t> o(size_t(L.o_off + std::max<int64_t>(n_q, 1) * ot));
  DevBuf<float> lse(size_t(n_q * P.h_q));
  DevBuf<int32_t> idx(P.idx), cu_q(P.cu_q), cu_k(P.cu_k);
  DevBuf<int32_t> q_pos(P.q_pos);
  // All-ones bytes: NaN as bf16 and as float, so an unwritten output cannot pass.
  o.poison(0xff);
  lse.poison(0xff);
  AttentionParams a = base_params(P);
  if (P.pass_cu) {
    a.seq.cu_seqlens_q = cu_q.ptr;
    a.seq.cu_seqlens_k = cu_k.ptr;
  }
  a.seq.q_pos = P.q_pos.empty() ? nullptr : q_pos.ptr;
  a.q = q.ptr + L.q_off;
  a.stride_q_head = qh;
  a.stride_q_tok = qt;
  a.k = k.ptr + L.kv_off;
  a.v = v.ptr + L.kv_off;
  a.stride_k_head = a.stride_v_head = kh;
  a.stride_k_tok = a.stride_v_tok = kt;
  a.o = o.ptr + L.o_off;
  a.stride_o_head = oh;
  a.stride_o_tok = ot;
  a.lse = lse.ptr;
  a.topk_idx = idx.ptr;
  Exec ex;
  ex.backend = Backend::cuda;
  ex.stream = stream;
  if (opt)
    cuda::run_sparse_attention_forward(a, stream, *opt);
  else
    sparse_attention_forward(a, ex);
  cuda_check(cudaStreamSynchronize(stream), "sparse_attention_forward");
  cuda_check(cudaGetLastError(), "sparse_attention_forward");
  Out out;
  const std::vector<uint16_t> ob = o.get();
  out.o_bits.resize(n_q * P.h_q * d);
  out.o.resize(out.o_bits.size());
  for (int64_t t = 0; t < n_q; ++t)
    for (int64_t e = 0; e < P.h_q; ++e)
      for (int64_t c = 0; c < d; ++c) {
        const uint16_t bits = ob[L.o_off + t * ot + e * oh + c];
        out.o_bits[(t * P.h_q + e) * d + c] = bits;
        out.o[(t * P.h_q + e) * d + c] = bf16_to_float(bf16{bits});
      }
  out.lse_raw = lse.get();
  out.lse.assign(out.lse_raw.begin(), out.lse_raw.end());
  // The padding between rows of o must be untouched.
  for (int64_t t = 0; t < n_q; ++t)
    for (int64_t e = 0; e < P.h_q; ++e)
      for (int64_t c = d; c < oh; ++c)
        if (ob[L.o_off + t * ot + e * oh + c] != 0xffff) throw std::runtime_error("o padding was written");
  return out;
}

// Derived bounds. o: the final bf16 rounding (u |o|), P rounded to bf16 before the P V product
// (u sum_j p_j |v_j| = u o_abs), the bf16 per-slot partials and the local pass's bf16-staged
// sink + own result (u o_abs: each is bounded by its own o_abs and the merge weights sum to 1), and
// 1e-4 o_abs for the rest: second-order terms (u * 2u = 3.1e-5), float32 accumulation over <= 256
// keys (256 * 2^-24 = 1.5e-5) and the ex2 / lg2
// approximations (~1e-6). lse: float32 dot products and exp/log approximations, ~1e-6 at
// these magnitudes: 1e-5 absolute + 1e-5 relative. Empty rows must be exactly o = 0, lse = -inf.
::testing::AssertionResult compare(const Problem& P, const Out& got, const Ref& ref, const std::string& what) {
  const int64_t d = P.d;
  double worst = 0;
  int64_t worst_e = -1;
  for (size_t e = 0; e < ref.o.size(); ++e) {
    const double g = got.o[e], r = ref.o[e];
    if (!std::isfinite(g))
      return ::testing::AssertionFailure() << what << ": o not finite at token " << e / d / P.h_q << ", head "
                                           << (e / d) % P.h_q << ", col " << e % d << " (got " << g << ")";
    const double tol = kU * std::abs(r) + (2 * kU + 1e-4) * ref.o_abs[e] + 1e-7;
    const double excess = std::abs(g - r) / tol;
    if (excess > worst) {
      worst = excess;
      worst_e = int64_t(e);
    }
  }
  if (worst > 1.0) {
    const int64_t e = worst_e;
    return ::testing::AssertionFailure() << what << ": o at token " << e / d / P.h_q << ", head " << (e / d) % P.h_q
                                         << ", col " << e % d << ": got " << got.o[e] << ", expected " << ref.o[e]
                                         << " (o_abs " << ref.o_abs[e] << "), error " << worst << "x the bound";
  }
  for (size_t e = 0; e < ref.lse.size(); ++e) {
    const double g = got.lse[e], r = ref.lse[e];
    const bool ok = std::isinf(r) ? g == r : std::abs(g - r) <= 1e-5 + 1e-5 * std::abs(r);
    if (!ok)
      return ::testing::AssertionFailure() << what << ": lse at token " << int64_t(e) / P.h_q << ", head "
                                           << int64_t(e) % P.h_q << ": got " << g << ", expected " << r;
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult check(const Problem& P, const std::string& what, const Layout& L = {}) {
  const Ref ref = cpu_reference(P);
  const Out got = run_gpu(P, L);
  return compare(P, got, ref, what);
}

std::string describe(const Problem& P) {
  std::ostringstream os;
  os << "n_q=" << P.n_q() << " n_k=" << P.n_k() << " batch=" << P.batch() << " h_q=" << P.h_q << " h_kv=" << P.h_kv
     << " d=" << P.d << " bk=" << P.bk << " topk=" << P.topk;
  return os.str();
}

TEST(CudaSparseFwd, SingleSequenceLengths) {
  REQUIRE_GPU();
  struct C {
    int32_t len;
    int64_t h_q, h_kv, d, bk, topk;
  };
  const C cases[] = {{1, 8, 2, 128, 128, 8},    {127, 8, 2, 128, 64, 8},   {128, 8, 2, 64, 128, 4},
                     {129, 8, 2, 128, 64, 3},   {1023, 8, 2, 128, 128, 8}, {1023, 4, 1, 64, 64, 5},
                     {4097, 2, 1, 128, 128, 16}};
  uint64_t seed = 100;
  for (const C& c : cases) {
    Problem P = make_problem(seed, {c.len}, {c.len}, c.h_q, c.h_kv, c.d, c.bk, c.topk);
    P.pass_cu = (seed % 2) == 0;
    select_random(P, seed + 1, /*fill=*/true);
    EXPECT_TRUE(check(P, describe(P)));
    ++seed;
  }
}

TEST(CudaSparseFwd, EveryVisibleBlockIsDenseCausal) {
  REQUIRE_GPU();
  // 1023 tokens in 16 blocks of 64 with topk 16: every row selects its whole causal prefix, so the
  // diagonal mask is exercised in every block position.
  Problem P = make_problem(7, {1023}, {1023}, 8, 2, 128, 64, 16);
  select_all(P);
  EXPECT_TRUE(check(P, describe(P)));
}

TEST(CudaSparseFwd, AllHeadDimsGroupSizesAndBlockSizes) {
  REQUIRE_GPU();
  uint64_t seed = 200;
  for (int64_t d : {64, 128})
    for (int64_t g : {1, 2, 4, 8, 16})
      for (int64_t bk : {64, 128}) {
        const int64_t h_kv = g >= 8 ? 1 : 2;
        Problem P = make_problem(seed, {300, 77}, {300, 77}, g * h_kv, h_kv, d, bk, bk == 64 ? 5 : 3);
        select_random(P, seed + 1, /*fill=*/(seed % 2) == 0);
        EXPECT_TRUE(check(P, describe(P)));
        ++seed;
      }
}

TEST(CudaSparseFwd, VarlenBatchTinyAndLong) {
  REQUIRE_GPU();
  const std::vector<int32_t> lens = {1, 0, 700, 3, 129, 1500, 2};
  Problem P = make_problem(300, lens, lens, 16, 2, 128, 128, 6);
  select_random(P, 301, false);
  EXPECT_TRUE(check(P, describe(P)));
  Problem P2 = make_problem(302, lens, lens, 8, 8, 64, 64, 4);
  select_random(P2, 303, true);
  EXPECT_TRUE(check(P2, describe(P2)));
}

TEST(CudaSparseFwd, ChunkedQueriesBottomRight) {
  REQUIRE_GPU();
  // Queries are the last len_q positions of longer key sequences (chunked prefill and decode).
  Problem P = make_problem(400, {100, 37, 1}, {1000, 37, 513}, 8, 2, 128, 64, 8);
  select_random(P, 401, true);
  EXPECT_TRUE(check(P, describe(P)));
}

TEST(CudaSparseFwd, ExplicitQueryPositions) {
  REQUIRE_GPU();
  Problem P = make_problem(500, {50, 20}, {900, 300}, 4, 1, 128, 128, 4);
  std::mt19937_64 rng(501);
  P.q_pos.resize(P.n_q());
  for (int64_t i = 0; i < P.n_q(); ++i) {
    const int64_t len_k = P.seq(i) == 0 ? 900 : 300;
    P.q_pos[i] = int32_t(std::uniform_int_distribution<int64_t>(0, len_k - 1)(rng));
  }
  P.q_pos[0] = 899;  // decode position: the last key
  P.q_pos[1] = 0;    // sees exactly one key
  select_random(P, 502, false);
  EXPECT_TRUE(check(P, describe(P)));
}

TEST(CudaSparseFwd, FewerThanTopkAndEmptyRows) {
  REQUIRE_GPU();
  // Random counts (many rows below topk), and every 7th (query, group) row all padding: o = 0,
  // lse = -inf for its heads.
  Problem P = make_problem(600, {800}, {800}, 8, 2, 64, 64, 12);
  select_random(P, 601, false, -1, -1, 7);
  const Ref ref = cpu_reference(P);
  int64_t empty = 0;
  for (double x : ref.lse) empty += std::isinf(x) ? 1 : 0;
  ASSERT_GT(empty, 0);
  EXPECT_TRUE(compare(P, run_gpu(P), ref, describe(P)));
}

TEST(CudaSparseFwd, SinkChosenByEveryQuerySplitsIntoChunks) {
  REQUIRE_GPU();
  // Block 0 is in every row: with topk 4 and bk 64 a work item holds at most 2 * 4 * 64 = 512
  // queries, so its 3000 queries span 6 items. Block 2 is in no row.
  for (int64_t g : {1, 16}) {
    Problem P = make_problem(700 + g, {3000}, {3000}, g, 1, 128, 64, 4);
    select_random(P, 701 + g, true, /*every=*/0, /*none=*/2);
    EXPECT_TRUE(check(P, describe(P)));
  }
}

TEST(CudaSparseFwd, StridedAndMisalignedOperands) {
  REQUIRE_GPU();
  Problem P = make_problem(800, {200, 130}, {200, 130}, 8, 2, 128, 64, 4);
  select_random(P, 801, true);
  Layout aligned;  // padded but 16-byte aligned: vector paths
  aligned.q_pad_head = 8;
  aligned.q_pad_tok = 16;
  aligned.kv_pad_tok = 8;
  aligned.o_pad_head = 8;
  EXPECT_TRUE(check(P, "aligned strides", aligned));
  Layout odd;  // rows not 16-byte aligned: q repack, scalar K/V loads, scalar o stores
  odd.q_pad_head = 3;
  odd.q_off = 1;
  odd.kv_pad_head = 1;
  odd.kv_pad_tok = 5;
  odd.kv_off = 3;
  odd.o_pad_head = 1;
  odd.o_off = 5;
  EXPECT_TRUE(check(P, "misaligned strides", odd));
}

TEST(CudaSparseFwd, CombineKernelPathWithoutTheLocalPass) {
  REQUIRE_GPU();
  // SparseFwdOptions::local_pass = false: every selected block in phase 1, then the combine kernel
  // (the benchmarks' baseline for the local pass). Same contract, same bounds.
  cuda::SparseFwdOptions opt;
  opt.local_pass = false;
  uint64_t seed = 1000;
  for (int64_t d : {64, 128})
    for (int64_t g : {1, 16}) {
      const int64_t bk = d == 64 ? 64 : 128;
      Problem P = make_problem(seed, {300, 77}, {300, 77}, g, 1, d, bk, 5);
      select_random(P, seed + 1, (seed % 2) == 0, /*every=*/0, -1, 5);
      EXPECT_TRUE(compare(P, run_gpu(P, {}, nullptr, &opt), cpu_reference(P), describe(P)));
      ++seed;
    }
  Problem P = make_problem(seed, {100, 37, 1}, {1000, 37, 513}, 8, 2, 128, 64, 8);
  select_random(P, seed + 1, true);
  EXPECT_TRUE(compare(P, run_gpu(P, {}, nullptr, &opt), cpu_reference(P), describe(P)));
}

TEST(CudaSparseFwd, TwentyRunsBitwiseIdentical) {
  REQUIRE_GPU();
  // A hot sink split into chunks, many groups, a non-default stream.
  Problem P = make_problem(900, {2000, 333}, {2000, 333}, 32, 2, 128, 64, 8);
  select_random(P, 901, true, 0);
  cudaStream_t stream;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  const Out first = run_gpu(P, {}, stream);
  EXPECT_TRUE(compare(P, first, cpu_reference(P), describe(P)));
  for (int run = 1; run < 20; ++run) {
    const Out again = run_gpu(P, {}, stream);
    ASSERT_EQ(0, std::memcmp(again.o_bits.data(), first.o_bits.data(), first.o_bits.size() * 2)) << "run " << run;
    ASSERT_EQ(0, std::memcmp(again.lse_raw.data(), first.lse_raw.data(), first.lse_raw.size() * 4)) << "run " << run;
  }
  cuda_check(cudaStreamDestroy(stream), "cudaStreamDestroy");
}

TEST(CudaSparseFwd, GarbageContentsStayInBounds) {
  REQUIRE_GPU();
  // The host never reads device contents, so any selection and any varlen arrays must run without
  // a fault (compute-sanitizer memcheck checks the accesses): out-of-range, negative, duplicate
  // and non-tail -1 block ids, positions past the sequence, non-monotone offsets past n.
  std::mt19937_64 rng(1000);
  Problem P = make_problem(1001, {100, 60, 40}, {300, 60, 40}, 8, 2, 128, 128, 6);
  select_random(P, 1002, true);
  for (size_t e = 0; e < P.idx.size(); e += 3) {
    const int32_t garbage[] = {-7, 1 << 30, INT32_MIN, INT32_MAX, 5, P.idx[e], -1, 2};
    P.idx[e] = garbage[rng() % 8];
  }
  P.q_pos.resize(P.n_q());
  for (auto& x : P.q_pos) x = int32_t(rng() % 1000) - 200;
  P.cu_k = {0, 5000, 90, 400};  // non-monotone, past n_k inside (the total stays n_k)
  Out out;
  EXPECT_NO_THROW(out = run_gpu(P));
  for (float x : out.lse_raw) EXPECT_FALSE(std::isnan(x));
  P.cu_q = {0, 180, -5, 200};  // the total stays n_q
  P.q_pos.clear();
  EXPECT_NO_THROW(run_gpu(P));
}

#endif  // MSA_WITH_CUDA

}  // namespace
}  // namespace msa::test
