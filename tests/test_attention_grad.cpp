// Tests of the main-branch backward on the CPU: float64 central finite differences of
// L = sum(o * w) for dq, dk and dv (sparse and dense, varlen, chunked queries), zero gradients
// for keys no query attends, and dtype / stride handling of the gradients.
#include <algorithm>
#include <cmath>
#include <limits>

#include "attention_case.h"
#include "test_util.h"

namespace msa::test {
namespace {

// The backward tests' defaults: small d and bk, float64 so finite differences resolve.
struct Problem : AttentionCase {
  std::vector<double> w;  // [n_q, h_q, d]: the loss weights, i.e. do
  Problem() {
    d = 12;
    bk = 8;
    dtype = DType::f64;
  }
};

Problem make_problem(uint64_t seed, std::vector<int32_t> cu_q, std::vector<int32_t> cu_k, int64_t h_q, int64_t h_kv,
                     int64_t d) {
  std::mt19937_64 rng(seed);
  Problem P;
  P.h_q = h_q;
  P.h_kv = h_kv;
  P.d = d;
  P.cu_q = std::move(cu_q);
  P.cu_k = std::move(cu_k);
  P.q = randn(rng, P.n_q() * h_q * d, 1.5);
  P.k = randn(rng, P.n_k() * h_kv * d);
  P.v = randn(rng, P.n_k() * h_kv * d);
  P.w = randn(rng, P.n_q() * h_q * d);
  return P;
}

// Random subsets of the visible blocks (possibly empty, with or without the local block), in
// random order, -1 padded; block `none` is selected by nobody.
void select_random(Problem& P, int64_t topk, uint64_t seed, int32_t none) {
  std::mt19937_64 rng(seed);
  P.topk = topk;
  P.idx.assign(P.n_q() * P.h_kv * topk, -1);
  for (int64_t i = 0; i < P.n_q(); ++i)
    for (int64_t r = 0; r < P.h_kv; ++r) {
      std::vector<int32_t> cand;
      for (int32_t b = 0; b <= P.pos(i) / P.bk; ++b)
        if (b != none) cand.push_back(b);
      std::shuffle(cand.begin(), cand.end(), rng);
      int64_t c = std::uniform_int_distribution<int64_t>(0, std::min<int64_t>(topk, cand.size()))(rng);
      std::copy_n(cand.begin(), c, P.idx.begin() + (i * P.h_kv + r) * topk);
    }
}

struct Forward {
  Buf o;
  std::vector<float> lse;
};

Forward forward(const Problem& P, int num_threads = 0) {
  Buf q(P.dtype, P.q), k(P.dtype, P.k), v(P.dtype, P.v);
  Forward f{Buf(P.dtype, P.n_q() * P.h_q * P.d), std::vector<float>(P.n_q() * P.h_q)};
  AttentionParams a = case_params(P);
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.o = f.o.data();
  a.lse = f.lse.data();
  case_forward(P, a, num_threads);
  return f;
}

// The backward params of P over its forward f with do = w; the gradients are the caller's.
AttentionBwdParams bwd_params(const Problem& P, const Buf& q, const Buf& k, const Buf& v, Forward& f, const Buf& w) {
  AttentionBwdParams a = case_params<AttentionBwdParams>(P);
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.o = f.o.data();
  a.lse = f.lse.data();
  a.do_ = w.data();
  return a;
}

double loss(const Problem& P) {
  // One thread: thousands of tiny calls, where thread start-up would dominate.
  std::vector<double> o = forward(P, 1).o.to_double();
  double l = 0;
  for (size_t x = 0; x < o.size(); ++x) l += o[x] * P.w[x];
  return l;
}

struct Grads {
  std::vector<double> dq, dk, dv;
  double max_abs_lse = 0;
};

// The library's backward with do = w, fed the library's forward o and lse. dq, dk, dv start
// poisoned so unwritten entries show.
Grads backward(const Problem& P, int num_threads = 0) {
  Forward f = forward(P);
  Buf q(P.dtype, P.q), k(P.dtype, P.k), v(P.dtype, P.v), w(P.dtype, P.w);
  Buf dq(P.dtype, P.q.size()), dk(P.dtype, P.k.size()), dv(P.dtype, P.v.size());
  dq.poison();
  dk.poison();
  dv.poison();
  AttentionBwdParams a = bwd_params(P, q, k, v, f, w);
  a.dq = dq.data();
  a.dk = dk.data();
  a.dv = dv.data();
  case_backward(P, a, num_threads);
  Grads g{dq.to_double(), dk.to_double(), dv.to_double()};
  for (float x : f.lse)
    if (std::isfinite(x)) g.max_abs_lse = std::max(g.max_abs_lse, double(std::abs(x)));
  return g;
}

// Central differences of the loss with respect to every entry of q, k and v.
Grads finite_differences(Problem P, double h) {
  Grads g;
  auto diff = [&](std::vector<double>& x, std::vector<double>& out) {
    out.resize(x.size());
    for (size_t e = 0; e < x.size(); ++e) {
      double x0 = x[e];
      x[e] = x0 + h;
      double lp = loss(P);
      x[e] = x0 - h;
      double lm = loss(P);
      x[e] = x0;
      out[e] = (lp - lm) / (2 * h);
    }
  };
  diff(P.q, g.dq);
  diff(P.k, g.dk);
  diff(P.v, g.dv);
  return g;
}

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m;
}

// Tolerance. The backward recomputes P = exp(s - lse) from the forward's float32 lse, so every P
// of a row carries the same relative error delta <= |lse| * 2^-24: dq and each (query, head) term
// of dk and dv are off by a relative delta (dS scales with P because D comes from o). Central
// differences with step h in float64 add h^2 |L'''| / 6 (~1e-11 here) and 2^-53 |L| / h of
// rounding. Entries are compared with rtol = 4 * delta_max plus that absolute FD noise, and with
// 4 * delta_max of the tensor's largest entry for terms that cancel.
void expect_grads_match_fd(const Problem& P, const std::string& what) {
  const double h = 1e-5;
  Grads got = backward(P), fd = finite_differences(P, h);
  const double delta = got.max_abs_lse * 0x1p-24;
  const double l_abs = [&] {
    std::vector<double> o = forward(P).o.to_double();
    double s = 0;
    for (size_t x = 0; x < o.size(); ++x) s += std::abs(o[x] * P.w[x]);
    return s;
  }();
  const double fd_noise = 1e-10 + 16 * 0x1p-53 * l_abs / h;
  const double rtol = 4 * delta + 1e-9;
  EXPECT_TRUE(allclose(got.dq, fd.dq, fd_noise + rtol * max_abs(fd.dq), rtol, what + " dq"));
  EXPECT_TRUE(allclose(got.dk, fd.dk, fd_noise + rtol * max_abs(fd.dk), rtol, what + " dk"));
  EXPECT_TRUE(allclose(got.dv, fd.dv, fd_noise + rtol * max_abs(fd.dv), rtol, what + " dv"));
  // The check must be able to fail: the gradients are far from zero.
  EXPECT_GT(max_abs(fd.dq), 1e-2);
  EXPECT_GT(max_abs(fd.dk), 1e-2);
  EXPECT_GT(max_abs(fd.dv), 1e-2);
}

// Keys that no (query, head) attends must get exactly zero dk and dv.
void expect_zero_rows(const Grads& g, const Problem& P, int64_t key0, int64_t key1, int64_t r,
                      const std::string& what) {
  for (int64_t j = key0; j < key1; ++j)
    for (int64_t c = 0; c < P.d; ++c) {
      ASSERT_EQ(g.dk[(j * P.h_kv + r) * P.d + c], 0.0) << what << ": dk of key row " << j << " head " << r;
      ASSERT_EQ(g.dv[(j * P.h_kv + r) * P.d + c], 0.0) << what << ": dv of key row " << j << " head " << r;
    }
}

TEST(AttentionGrad, DenseSingleSequence) {
  Problem P = make_problem(1, {0, 37}, {0, 37}, 4, 2, 12);
  expect_grads_match_fd(P, "dense n 37");
}

TEST(AttentionGrad, DenseGroupOf4) {
  Problem P = make_problem(2, {0, 21}, {0, 21}, 4, 1, 8);
  expect_grads_match_fd(P, "dense g 4");
}

TEST(AttentionGrad, SparseSingleSequence) {
  Problem P = make_problem(3, {0, 37}, {0, 37}, 4, 2, 12);
  P.bk = 8;  // 5 blocks, the last one partial
  select_random(P, 3, 4, /*none=*/1);
  expect_grads_match_fd(P, "sparse n 37");
  Grads g = backward(P);
  for (int64_t r = 0; r < P.h_kv; ++r) expect_zero_rows(g, P, 8, 16, r, "block 1 selected by none");
}

TEST(AttentionGrad, SparseEmptyRowsGiveZeroDq) {
  Problem P = make_problem(5, {0, 30}, {0, 30}, 4, 2, 8);
  select_random(P, 2, 6, -1);
  for (int64_t i = 0; i < P.n_q(); i += 3) std::fill_n(&P.idx[(i * P.h_kv + 0) * P.topk], P.topk, -1);
  expect_grads_match_fd(P, "sparse with empty rows");
  Grads g = backward(P);
  for (int64_t i = 0; i < P.n_q(); i += 3)
    for (int64_t e = 0; e < 2 * P.d; ++e)  // heads 0 and 1 form group 0
      ASSERT_EQ(g.dq[i * P.h_q * P.d + e], 0.0) << "query " << i;
}

TEST(AttentionGrad, VarlenBatch) {
  for (bool sparse : {false, true}) {
    Problem P = make_problem(sparse ? 8 : 7, {0, 13, 42}, {0, 13, 42}, 4, 2, 10);
    if (sparse) select_random(P, 2, 9, -1);
    expect_grads_match_fd(P, sparse ? "sparse varlen" : "dense varlen");
  }
}

TEST(AttentionGrad, ChunkedQueries) {
  for (bool sparse : {false, true}) {
    // Sequence 0: 6 queries at explicit positions of 40 keys; sequence 1: 4 queries of 19 keys.
    Problem P = make_problem(sparse ? 11 : 10, {0, 6, 10}, {0, 40, 59}, 4, 2, 8);
    P.q_pos = {5, 33, 20, 20, 0, 17, 14, 3, 9, 12};
    if (sparse) select_random(P, 3, 12, -1);
    expect_grads_match_fd(P, sparse ? "sparse chunk" : "dense chunk");
    // Keys past the last query position of each sequence are seen by nobody.
    Grads g = backward(P);
    for (int64_t r = 0; r < P.h_kv; ++r) {
      expect_zero_rows(g, P, 34, 40, r, "sequence 0 keys after position 33");
      expect_zero_rows(g, P, 40 + 15, 59, r, "sequence 1 keys after position 14");
    }
  }
  // Bottom-right aligned chunk: the last 9 positions of 31.
  Problem P = make_problem(13, {0, 9}, {0, 31}, 4, 2, 8);
  select_random(P, 2, 14, -1);
  expect_grads_match_fd(P, "sparse bottom-right chunk");
}

// float32 gradients equal the float64 gradients of the same (float32-representable) inputs up to
// the rounding of o (which enters D) and of the outputs: a few float32 ulps of the tensor scale.
TEST(AttentionGrad, Float32MatchesFloat64) {
  for (bool sparse : {false, true}) {
    Problem P = make_problem(20, {0, 70, 100}, {0, 70, 100}, 8, 2, 16);
    for (auto* x : {&P.q, &P.k, &P.v, &P.w}) *x = Buf(DType::f32, *x).to_double();
    if (sparse) select_random(P, 3, 21, -1);
    Grads g64 = backward(P);
    P.dtype = DType::f32;
    Grads g32 = backward(P);
    const double tol = 64 * 0x1p-24;
    EXPECT_TRUE(allclose(g32.dq, g64.dq, tol * max_abs(g64.dq), 0x1p-24, "dq"));
    EXPECT_TRUE(allclose(g32.dk, g64.dk, tol * max_abs(g64.dk), 0x1p-24, "dk"));
    EXPECT_TRUE(allclose(g32.dv, g64.dv, tol * max_abs(g64.dv), 0x1p-24, "dv"));
  }
}

TEST(AttentionGrad, ThreadCountDoesNotChangeResult) {
  Problem P = make_problem(30, {0, 90, 130}, {0, 90, 130}, 8, 2, 16);
  P.bk = 32;  // enough work per sequence for the library to use both threads
  select_random(P, 3, 31, -1);
  Grads a = backward(P, 1), b = backward(P, 2);
  EXPECT_EQ(a.dq, b.dq);
  EXPECT_EQ(a.dk, b.dk);
  EXPECT_EQ(a.dv, b.dv);
}

// Non-contiguous do / dq / dk / dv give the contiguous result; gaps stay untouched.
TEST(AttentionGrad, NonContiguousGradients) {
  Problem P = make_problem(40, {0, 50}, {0, 50}, 4, 2, 8);
  select_random(P, 3, 41, -1);
  Grads ref = backward(P);
  const int64_t n = P.n_q(), h_q = P.h_q, h_kv = P.h_kv, d = P.d;
  Forward f = forward(P);
  Buf q(P.dtype, P.q), k(P.dtype, P.k), v(P.dtype, P.v);
  // do: tokens padded by d; dq: head-major [h_q, n, d]; dk: heads padded to 2d; dv: head-major.
  Buf w(P.dtype, n * (h_q + 1) * d), dq(P.dtype, h_q * n * d), dk(P.dtype, n * h_kv * 2 * d), dv(P.dtype, h_kv * n * d);
  w.poison();
  dq.poison();
  dk.poison();
  dv.poison();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < h_q * d; ++e) w.set(t * (h_q + 1) * d + e, P.w[t * h_q * d + e]);
  AttentionBwdParams a = bwd_params(P, q, k, v, f, w);
  a.stride_do_tok = (h_q + 1) * d;
  a.dq = dq.data();
  a.stride_dq_tok = d;
  a.stride_dq_head = n * d;
  a.dk = dk.data();
  a.stride_dk_head = 2 * d;
  a.dv = dv.data();
  a.stride_dv_tok = d;
  a.stride_dv_head = n * d;
  sparse_attention_backward(a);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < d; ++c) {
      for (int64_t h = 0; h < h_q; ++h)
        ASSERT_EQ(dq.get((h * n + t) * d + c), ref.dq[(t * h_q + h) * d + c]) << "dq " << t << " " << h;
      for (int64_t r = 0; r < h_kv; ++r) {
        ASSERT_EQ(dk.get((t * h_kv + r) * 2 * d + c), ref.dk[(t * h_kv + r) * d + c]) << "dk " << t << " " << r;
        ASSERT_TRUE(std::isnan(dk.get((t * h_kv + r) * 2 * d + d + c))) << "dk gap written";
        ASSERT_EQ(dv.get((r * n + t) * d + c), ref.dv[(t * h_kv + r) * d + c]) << "dv " << t << " " << r;
      }
    }
}

}  // namespace
}  // namespace msa::test
