// Tests of decode_attention and append_kv on the CUDA backend against the CPU reference on the
// same bf16 values: paged caches with shuffled pages and NaN in every slot no request may read,
// odd lengths and lengths below topk * bk, 1 / 2 / 8 / 16 / 17 query tokens per request, mixed
// batches with requests without queries, all -1 rows, bk 16 / 64 / 128, d 64 / 128, g 1 .. 32 (and
// 3), sparse and dense, planned (exact and larger plans, a plan reused for shorter contexts) and
// convenience forms, repeated runs bitwise equal, garbage device arrays (memory safety), append_kv
// byte for byte against the CPU append, and shape errors. GPU tests skip with a message when no
// device is visible.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

namespace msa::test {
namespace {

// Shape errors are host checks: no GPU needed, pointers are never dereferenced.
TEST(CudaDecodeAttention, UnsupportedShapesThrowNamingTheArgument) {
  REQUIRE_CUDA_BUILD();
  alignas(16) int32_t dummy[64] = {};
  DecodeAttentionParams p;
  p.cache.batch = 1;
  p.cache.n_pages = 4;
  p.cache.bk = 64;
  p.cache.h_kv = 2;
  p.cache.d = 128;
  p.cache.k_cache = p.cache.v_cache = dummy;
  p.cache.block_table = dummy;
  p.cache.max_blocks = 4;
  p.cache.seq_lens = dummy;
  p.h_q = 8;
  p.n_q = 1;
  p.q = dummy;
  p.topk_idx = dummy;
  p.topk = 4;
  p.o = dummy;
  p.lse = reinterpret_cast<float*>(dummy);
  Exec ex;
  ex.backend = Backend::cuda;
  auto conv = [&](auto change, std::initializer_list<const char*> frags) {
    DecodeAttentionParams a = p;
    change(a);
    return throws_error([&] { decode_attention(a, ex); }, frags);
  };
  EXPECT_TRUE(conv([](DecodeAttentionParams& a) { a.cache.d = 96; }, {"msa::decode_attention", "cache.d = 96"}));
  EXPECT_TRUE(conv([](DecodeAttentionParams& a) { a.cache.bk = 8; }, {"cache.bk = 8", "multiple of 16"}));
  EXPECT_TRUE(conv([](DecodeAttentionParams& a) { a.cache.bk = 512; }, {"cache.bk = 512"}));
  EXPECT_TRUE(conv([](DecodeAttentionParams& a) { a.dtype = DType::f32; },
                   {"msa::decode_attention", "dtype = float32", "bfloat16"}));
  EXPECT_TRUE(conv([](DecodeAttentionParams& a) { a.topk = 33; }, {"topk = 33"}));
  EXPECT_TRUE(conv([](DecodeAttentionParams& a) { a.h_q = 7; }, {"h_q = 7"}));
  EXPECT_TRUE(conv([](DecodeAttentionParams& a) { a.cache.batch = 2; }, {"cu_seqlens_q"}));

  // Planned form: a plan made by hand (plan_decode itself needs a device for its SM count).
  DecodePlan plan;
  plan.backend = Backend::cuda;
  plan.shape.batch = 1;
  plan.shape.n_q = 1;
  plan.shape.max_blocks = 4;
  plan.shape.bk = 64;
  plan.shape.h_kv = 2;
  plan.shape.h_q = 8;
  plan.shape.d = 128;
  plan.shape.topk = 4;
  auto planned = [&](auto change, std::initializer_list<const char*> frags) {
    DecodeAttentionParams a = p;
    DecodePlan pl = plan;
    change(a, pl);
    return throws_error([&] { decode_attention(a, pl, dummy, ex); }, frags);
  };
  EXPECT_TRUE(planned([](DecodeAttentionParams& a, DecodePlan& pl) { a.cache.d = pl.shape.d = 96; }, {"cache.d = 96"}));
  EXPECT_TRUE(planned([](DecodeAttentionParams& a, DecodePlan&) { a.topk_idx = nullptr; },
                      {"dense decode", "plan.shape.topk = 4"}));
  EXPECT_TRUE(planned([](DecodeAttentionParams& a, DecodePlan&) { a.n_q = 2; }, {"n_q = 2", "plan.shape.n_q = 1"}));
  EXPECT_TRUE(planned([](DecodeAttentionParams& a, DecodePlan&) { a.cache.max_blocks = 5; }, {"cache.max_blocks = 5"}));
  EXPECT_TRUE(
      planned([&](DecodeAttentionParams& a, DecodePlan&) { a.cache.k_cache = reinterpret_cast<uint8_t*>(dummy) + 2; },
              {"cache.k_cache", "16-byte aligned"}));
  DecodeShape s = plan.shape;
  s.d = 32;
  EXPECT_TRUE(throws_error([&] { plan_decode(s, ex); }, {"msa::plan_decode", "shape.d = 32"}));
  s.d = 128;
  s.bk = 40;
  EXPECT_TRUE(throws_error([&] { plan_decode(s, ex); }, {"shape.bk = 40"}));
}

#ifndef MSA_WITH_CUDA

TEST(CudaDecodeAttention, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

constexpr double kU = 1.0 / 256;  // bf16 unit roundoff, 2^-8

// A batch over a paged pool: per request its length and query count; pages shuffled; NaN in
// every pool slot that is not below some request's seq_lens (unused pages, page tails).
struct Case {
  int64_t h_q = 8, h_kv = 2, d = 128, bk = 64, topk = 4;  // topk 0: dense
  std::vector<int32_t> lens, nq, cu_q, table;
  int64_t batch = 0, n_q = 0, n_pages = 0, max_blocks = 0;
  std::vector<double> kc, vc;  // pool [n_pages, bk, h_kv, d], NaN where unused
  std::vector<double> q;       // [n_q, h_q, d]
  std::vector<int32_t> idx;    // [n_q, h_kv, topk]
  int64_t g() const { return h_q / h_kv; }
  int64_t row() const { return h_kv * d; }
};

Case make_case(uint64_t seed, int64_t h_q, int64_t h_kv, int64_t d, int64_t bk, int64_t topk, std::vector<int32_t> lens,
               std::vector<int32_t> nq, int64_t extra_blocks = 2) {
  std::mt19937_64 rng(seed);
  Case c;
  c.h_q = h_q, c.h_kv = h_kv, c.d = d, c.bk = bk, c.topk = topk;
  c.lens = std::move(lens);
  c.nq = std::move(nq);
  c.batch = int64_t(c.lens.size());
  for (int64_t b = 0; b < c.batch; ++b) c.nq[b] = std::min(c.nq[b], c.lens[b]);
  c.cu_q = cu_from_lengths(c.nq);
  c.n_q = c.cu_q.back();
  int64_t used = 0;
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t nb = (c.lens[b] + bk - 1) / bk;
    c.max_blocks = std::max(c.max_blocks, nb + extra_blocks);
    used += nb;
  }
  c.n_pages = used + 3;
  std::vector<int32_t> perm(c.n_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  c.table.assign(c.batch * c.max_blocks, -1);
  c.kc.assign(c.n_pages * bk * c.row(), std::nan(""));
  c.vc = c.kc;
  int64_t next = 0;
  std::normal_distribution<double> nd(0.0, 1.0);
  auto bf = [](double x) { return double(bf16_to_float(float_to_bf16(float(x)))); };
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t j = 0; j < (c.lens[b] + bk - 1) / bk; ++j) {
      const int32_t page = perm[next++];
      c.table[b * c.max_blocks + j] = page;
      for (int64_t t = 0; t < bk && j * bk + t < c.lens[b]; ++t)
        for (int64_t e = 0; e < c.row(); ++e) {
          c.kc[(page * bk + t) * c.row() + e] = bf(nd(rng));
          c.vc[(page * bk + t) * c.row() + e] = bf(nd(rng));
        }
    }
  // q a little larger than k: peaked softmax rows give the relative tolerances teeth.
  c.q = randn(rng, c.n_q * h_q * d, 2.0, DType::bf16);
  return c;
}

// Random visible blocks per (token, group): the own block most of the time, a random count of
// others (so many rows hold fewer than topk), in random order, then -1; every empty_every-th row
// all -1.
void select_random(Case& c, uint64_t seed, int empty_every = 0) {
  if (c.topk == 0) return;
  std::mt19937_64 rng(seed);
  c.idx.assign(c.n_q * c.h_kv * c.topk, -1);
  std::bernoulli_distribution take_own(0.85);
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t t = 0; t < c.nq[b]; ++t) {
      const int64_t i = c.cu_q[b] + t, pos = c.lens[b] - c.nq[b] + t;
      const int32_t own = int32_t(pos / c.bk);
      for (int64_t r = 0; r < c.h_kv; ++r) {
        const int64_t rid = i * c.h_kv + r;
        if (empty_every > 0 && rid % empty_every == 0) continue;
        std::vector<int32_t> row, cand;
        if (take_own(rng)) row.push_back(own);
        for (int32_t j = 0; j < own; ++j) cand.push_back(j);
        std::shuffle(cand.begin(), cand.end(), rng);
        const int64_t room = std::min<int64_t>(c.topk - int64_t(row.size()), int64_t(cand.size()));
        const int64_t n = rng() % 4 == 0 ? std::uniform_int_distribution<int64_t>(0, room)(rng) : room;
        row.insert(row.end(), cand.begin(), cand.begin() + n);
        std::shuffle(row.begin(), row.end(), rng);
        std::copy(row.begin(), row.end(), c.idx.begin() + rid * c.topk);
      }
    }
}

struct Ref {
  std::vector<double> o, lse, o_abs;
};

// The CPU backend in float32 on the same bf16-exact values, and the same attention applied to
// |v| (sum_j p_j |v_j|, the scale of the bf16 errors).
Ref cpu_reference(const Case& c) {
  Ref ref;
  std::vector<double> vabs(c.vc.size());
  for (size_t e = 0; e < vabs.size(); ++e) vabs[e] = std::abs(c.vc[e]);
  Buf kc(DType::f32, c.kc), vc(DType::f32, c.vc), va(DType::f32, vabs), q(DType::f32, c.q);
  for (int pass = 0; pass < 2; ++pass) {
    Buf o(DType::f32, size_t(c.n_q * c.h_q * c.d));
    std::vector<float> lse(c.n_q * c.h_q);
    DecodeAttentionParams p;
    p.cache.batch = c.batch;
    p.cache.n_pages = c.n_pages;
    p.cache.bk = c.bk;
    p.cache.h_kv = c.h_kv;
    p.cache.d = c.d;
    p.cache.k_cache = kc.data();
    p.cache.v_cache = pass == 0 ? vc.data() : va.data();
    p.cache.block_table = c.table.data();
    p.cache.max_blocks = c.max_blocks;
    p.cache.seq_lens = c.lens.data();
    p.dtype = DType::f32;
    p.h_q = c.h_q;
    p.n_q = c.n_q;
    p.cu_seqlens_q = c.cu_q.data();
    p.q = q.data();
    p.topk_idx = c.topk ? c.idx.data() : nullptr;
    p.topk = c.topk;
    p.o = o.data();
    p.lse = lse.data();
    decode_attention(p);
    if (pass == 0) {
      ref.o = o.to_double();
      ref.lse.assign(lse.begin(), lse.end());
    } else {
      ref.o_abs = o.to_double();
    }
  }
  return ref;
}

struct Out {
  std::vector<double> o, lse;
};

// The device copy of a case; q and o with padded token strides.
struct Dev {
  const Case& c;
  int64_t sq, so;
  DevBuf<uint8_t> kc, vc, q, o;
  DevBuf<int32_t> table, lens, cu, idx;
  DevBuf<float> lse;
  explicit Dev(const Case& c_)
      : c(c_),
        sq(c_.h_q * c_.d + 24),
        so(c_.h_q * c_.d + 8),
        kc(Buf(DType::bf16, c_.kc).bytes),
        vc(Buf(DType::bf16, c_.vc).bytes),
        q(padded(c_.q, c_.n_q, c_.h_q * c_.d, sq)),
        o(size_t(std::max<int64_t>(c_.n_q, 1) * so * 2)),
        table(c_.table),
        lens(c_.lens),
        cu(c_.cu_q),
        idx(c_.idx),
        lse(size_t(std::max<int64_t>(c_.n_q, 1) * c_.h_q)) {}

  static std::vector<uint8_t> padded(const std::vector<double>& x, int64_t n, int64_t row, int64_t stride) {
    Buf b(DType::bf16, size_t(std::max<int64_t>(n, 1) * stride));
    b.poison();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t e = 0; e < row; ++e) b.set(i * stride + e, x[i * row + e]);
    return b.bytes;
  }

  DecodeAttentionParams params() {
    DecodeAttentionParams p;
    p.cache.batch = c.batch;
    p.cache.n_pages = c.n_pages;
    p.cache.bk = c.bk;
    p.cache.h_kv = c.h_kv;
    p.cache.d = c.d;
    p.cache.k_cache = kc.ptr;
    p.cache.v_cache = vc.ptr;
    p.cache.block_table = table.ptr;
    p.cache.max_blocks = c.max_blocks;
    p.cache.seq_lens = lens.ptr;
    p.dtype = DType::bf16;
    p.h_q = c.h_q;
    p.n_q = c.n_q;
    p.cu_seqlens_q = cu.ptr;
    p.q = q.ptr;
    p.stride_q_tok = sq;
    p.topk_idx = c.topk ? idx.ptr : nullptr;
    p.topk = c.topk;
    p.o = o.ptr;
    p.stride_o_tok = so;
    p.lse = lse.ptr;
    return p;
  }

  Out get() {
    cuda_check(cudaDeviceSynchronize(), "decode_attention");
    Out out;
    std::vector<uint8_t> ob = o.get();
    Buf b(DType::bf16, ob.size() / 2);
    b.bytes = ob;
    out.o.resize(c.n_q * c.h_q * c.d);
    for (int64_t i = 0; i < c.n_q; ++i)
      for (int64_t e = 0; e < c.h_q * c.d; ++e) out.o[i * c.h_q * c.d + e] = b.get(i * so + e);
    std::vector<float> l = lse.get();
    out.lse.assign(l.begin(), l.begin() + c.n_q * c.h_q);
    return out;
  }
};

DecodeShape shape_of(const Case& c) {
  DecodeShape s;
  s.batch = c.batch;
  s.n_q = c.n_q;
  s.max_q = 16;
  s.max_blocks = c.max_blocks;
  s.bk = c.bk;
  s.h_kv = c.h_kv;
  s.h_q = c.h_q;
  s.d = c.d;
  s.d_idx = 0;
  s.topk = c.topk;
  return s;
}

Exec cuda_exec() {
  Exec ex;
  ex.backend = Backend::cuda;
  return ex;
}

// Runs the planned form with plan (a fresh workspace) or the convenience form (plan == nullptr).
Out run_gpu(Dev& dev, const DecodePlan* plan) {
  dev.o.poison(0xff);
  dev.lse.poison(0xff);
  DecodeAttentionParams p = dev.params();
  if (plan) {
    DevBuf<uint8_t> ws(plan->workspace_bytes);
    decode_attention(p, *plan, ws.ptr, cuda_exec());
    return dev.get();
  }
  decode_attention(p, cuda_exec());
  return dev.get();
}

// Derived bounds. o: the final bf16 rounding (u |o|), P rounded to bf16 before the P V product
// (u sum_j p_j |v_j| = u o_abs), one more u o_abs of headroom for the split partials being
// normalised separately and merged (float32, each bounded by its own o_abs, weights summing to
// 1), and 1e-4 o_abs for second-order terms, float32 accumulation and the ex2 / lg2
// approximations. lse: float32 dot products and sums over up to a few thousand keys with
// approximate ex2 / lg2: 2e-5 absolute + 1e-5 relative. Empty rows: exactly o = 0, lse = -inf.
::testing::AssertionResult compare(const Case& c, const Out& got, const Ref& ref, const std::string& what) {
  double worst = 0;
  int64_t worst_e = -1;
  const int64_t d = c.d;
  for (size_t e = 0; e < ref.o.size(); ++e) {
    const double g = got.o[e], r = ref.o[e];
    if (!std::isfinite(g))
      return ::testing::AssertionFailure() << what << ": o not finite at token " << e / d / c.h_q << ", head "
                                           << (e / d) % c.h_q << ", col " << e % d << " (got " << g << ")";
    const double tol = kU * std::abs(r) + (2 * kU + 1e-4) * ref.o_abs[e] + 1e-7;
    const double excess = std::abs(g - r) / tol;
    if (excess > worst) worst = excess, worst_e = int64_t(e);
  }
  if (worst > 1.0) {
    const int64_t e = worst_e;
    return ::testing::AssertionFailure() << what << ": o at token " << e / d / c.h_q << ", head " << (e / d) % c.h_q
                                         << ", col " << e % d << ": got " << got.o[e] << ", expected " << ref.o[e]
                                         << " (o_abs " << ref.o_abs[e] << "), error " << worst << "x the bound";
  }
  double worst_lse = 0;
  for (size_t e = 0; e < ref.lse.size(); ++e) {
    const double g = got.lse[e], r = ref.lse[e];
    if (std::isinf(r) || std::isinf(g) || std::isnan(g)) {
      if (g != r)
        return ::testing::AssertionFailure() << what << ": lse at token " << int64_t(e) / c.h_q << ", head "
                                             << int64_t(e) % c.h_q << ": got " << g << ", expected " << r;
      continue;
    }
    worst_lse = std::max(worst_lse, std::abs(g - r) / (2e-5 + 1e-5 * std::abs(r)));
  }
  if (worst_lse > 1.0) return ::testing::AssertionFailure() << what << ": lse error " << worst_lse << "x the bound";
  std::cout << "[ worst    ] " << what << ": o " << worst << "x, lse " << worst_lse << "x the bound\n";
  return ::testing::AssertionSuccess();
}

std::string describe(const Case& c) {
  std::ostringstream os;
  os << "batch=" << c.batch << " n_q=" << c.n_q << " h_q=" << c.h_q << " h_kv=" << c.h_kv << " d=" << c.d
     << " bk=" << c.bk << " topk=" << c.topk << (c.topk ? "" : " (dense)");
  return os.str();
}

struct Cfg {
  int64_t d, bk, h_q, h_kv, topk;
};

class CudaDecodeMixed : public ::testing::TestWithParam<Cfg> {};

// A mixed batch: lengths 1, bk - 1, bk + 1, topk * bk - 1, odd ones, one request without
// queries, 1 .. 17 query tokens; a few all -1 rows. Planned (exact shape) and convenience forms
// agree bitwise; both meet the bounds against the CPU reference; a larger plan too.
TEST_P(CudaDecodeMixed, MatchesCpuReference) {
  REQUIRE_GPU();
  const Cfg f = GetParam();
  const int32_t bk = int32_t(f.bk), kb = int32_t(std::max<int64_t>(f.topk, 2) * f.bk);
  std::vector<int32_t> lens = {1, bk - 1, bk + 1, kb - 1, 2 * bk + 7, 3 * kb + 5, 300, 1023, kb + bk, 4097};
  std::vector<int32_t> nq = {1, 2, 8, 16, 17, 1, 0, 5, 16, 1};
  Case c = make_case(100 + f.d + f.bk * 3 + f.h_q * 7 + f.topk, f.h_q, f.h_kv, f.d, f.bk, f.topk, lens, nq);
  select_random(c, 7 + f.topk, 5);
  const Ref ref = cpu_reference(c);
  Dev dev(c);
  const DecodePlan plan = plan_decode(shape_of(c), cuda_exec());
  const Out planned = run_gpu(dev, &plan);
  EXPECT_TRUE(compare(c, planned, ref, "planned " + describe(c)));
  const Out conv = run_gpu(dev, nullptr);
  EXPECT_TRUE(compare(c, conv, ref, "convenience " + describe(c)));
  EXPECT_EQ(planned.o, conv.o) << "planned and convenience forms differ";
  EXPECT_EQ(planned.lse, conv.lse);
  // Repeated runs are bitwise equal (no atomics in the sums).
  const Out again = run_gpu(dev, &plan);
  EXPECT_EQ(planned.o, again.o);
  // A plan for a larger step (more requests, tokens and table width) serves this one.
  DecodeShape big = shape_of(c);
  big.batch *= 3;
  big.n_q = big.n_q * 4 + 3;
  big.max_blocks *= 2;
  const DecodePlan plan_big = plan_decode(big, cuda_exec());
  EXPECT_TRUE(compare(c, run_gpu(dev, &plan_big), ref, "larger plan " + describe(c)));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaDecodeMixed,
                         ::testing::Values(Cfg{128, 128, 64, 4, 16}, Cfg{128, 64, 16, 2, 8}, Cfg{64, 128, 8, 2, 4},
                                           Cfg{64, 64, 4, 4, 32}, Cfg{128, 128, 4, 2, 1}, Cfg{128, 64, 32, 1, 4},
                                           Cfg{64, 16, 6, 2, 4}, Cfg{128, 128, 64, 4, 0}, Cfg{64, 64, 16, 1, 0},
                                           Cfg{128, 64, 8, 8, 0}, Cfg{64, 128, 48, 3, 0}),
                         [](const auto& info) {
                           const Cfg& f = info.param;
                           return "d" + std::to_string(f.d) + "_bk" + std::to_string(f.bk) + "_g" +
                                  std::to_string(f.h_q / f.h_kv) +
                                  (f.topk ? "_topk" + std::to_string(f.topk) : std::string("_dense"));
                         });

// Single request, null cu_seqlens_q; one token at 20K context (many splits, sparse and dense).
TEST(CudaDecodeAttention, SingleRequestLongContext) {
  REQUIRE_GPU();
  for (int64_t topk : {16, 0}) {
    Case c = make_case(55 + topk, 16, 1, 128, 128, topk, {20011}, {3});
    select_random(c, 3);
    const Ref ref = cpu_reference(c);
    Dev dev(c);
    dev.o.poison(0xff);
    DecodeAttentionParams p = dev.params();
    p.cu_seqlens_q = nullptr;
    decode_attention(p, cuda_exec());
    EXPECT_TRUE(compare(c, dev.get(), ref, "single request " + describe(c)));
  }
}

// One plan made for the longest contexts, run on the same batch with shorter seq_lens (and new
// query positions), as a decode loop replayed from a graph would.
TEST(CudaDecodeAttention, PlanReusedForShorterContexts) {
  REQUIRE_GPU();
  for (int64_t topk : {8, 0}) {
    Case big = make_case(77, 16, 2, 128, 64, topk, {5000, 3000, 900, 64}, {1, 4, 2, 1});
    const DecodePlan plan = plan_decode(shape_of(big), cuda_exec());
    for (int step = 0; step < 3; ++step) {
      std::vector<int32_t> lens = {5000 - 1700 * step, 3000 - 999 * step, 900 - 290 * step, 64 - 20 * step};
      Case c = make_case(78 + step, 16, 2, 128, 64, topk, lens, {1, 4, 2, 1}, 0);
      c.max_blocks = big.max_blocks;  // the same table width: wider rows, -1 tails
      std::vector<int32_t> table(c.batch * c.max_blocks, -1);
      const int64_t w = (*std::max_element(lens.begin(), lens.end()) + 63) / 64;
      for (int64_t b = 0; b < c.batch; ++b)
        for (int64_t j = 0; j < w; ++j) table[b * c.max_blocks + j] = c.table[b * w + j];
      c.table = table;
      select_random(c, 90 + step);
      const Ref ref = cpu_reference(c);
      Dev dev(c);
      EXPECT_TRUE(compare(c, run_gpu(dev, &plan), ref, "step " + std::to_string(step) + " " + describe(c)));
    }
  }
}

// Every row all -1: o = 0 and lse = -inf exactly; and a batch whose only queries see no block.
TEST(CudaDecodeAttention, AllEmptyRows) {
  REQUIRE_GPU();
  Case c = make_case(5, 8, 2, 128, 64, 4, {70, 200}, {2, 3});
  c.idx.assign(c.n_q * c.h_kv * c.topk, -1);
  Dev dev(c);
  const DecodePlan plan = plan_decode(shape_of(c), cuda_exec());
  const Out got = run_gpu(dev, &plan);
  for (double x : got.o) ASSERT_EQ(x, 0.0);
  for (double x : got.lse) ASSERT_EQ(x, -std::numeric_limits<double>::infinity());
}

// Garbage in the device arrays (page ids, block numbers, offsets, lengths) must never make the
// kernel touch memory outside the tensors; the results are unspecified. Run under memcheck.
TEST(CudaDecodeAttention, GarbageDeviceArraysStayInBounds) {
  REQUIRE_GPU();
  for (int64_t topk : {8, 0}) {
    Case c = make_case(9, 16, 2, 64, 64, topk, {300, 129, 1000}, {3, 1, 2});
    select_random(c, 4);
    std::mt19937_64 rng(3);
    for (auto& t : c.table)
      if (rng() % 3 == 0) t = int32_t(rng() % 2 ? -int32_t(rng() % 100) : int32_t(c.n_pages + rng() % 100));
    for (auto& j : c.idx)
      if (rng() % 3 == 0) j = int32_t(rng() % 2 ? 1000000 : -5);
    c.lens = {100000, -7, 1000};
    c.cu_q = {0, 5, 2, int32_t(c.n_q)};
    Dev dev(c);
    const DecodePlan plan = plan_decode(shape_of(c), cuda_exec());
    run_gpu(dev, &plan);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  }
}

// append_kv on the GPU writes the same bytes as the CPU append (NaN of untouched slots
// included): random steps of 0..17 new tokens per request across page boundaries, strided k / v,
// with and without the index-key cache.
TEST(CudaDecodeAppend, EqualsCpuAppend) {
  REQUIRE_GPU();
  for (bool with_idx : {true, false}) {
    const int64_t bk = 64, h_kv = 2, d = 128, d_idx = 64, row = h_kv * d;
    std::vector<int32_t> target = {300, 17, 64, 901, 5};
    std::vector<int32_t> cur = {1, 0, 64, 100, 2};
    const int64_t batch = int64_t(target.size());
    int64_t max_blocks = 0, used = 0;
    for (int32_t l : target)
      max_blocks = std::max<int64_t>(max_blocks, (l + bk - 1) / bk + 1), used += (l + bk - 1) / bk;
    const int64_t n_pages = used + 4;
    std::mt19937_64 rng(12 + with_idx);
    std::vector<int32_t> perm(n_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> table(batch * max_blocks, -1);
    int64_t next = 0;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t j = 0; j < (target[b] + bk - 1) / bk; ++j) table[b * max_blocks + j] = perm[next++];
    Buf kc(DType::bf16, size_t(n_pages * bk * row)), vc(DType::bf16, kc.size()),
        xc(DType::bf16, size_t(n_pages * bk * d_idx));
    kc.poison(), vc.poison(), xc.poison();
    DevBuf<uint8_t> dkc(kc.bytes), dvc(vc.bytes), dxc(xc.bytes);
    DevBuf<int32_t> dtable(table);
    int steps = 0;
    while (cur != target) {
      std::vector<int32_t> n_new(batch);
      for (int64_t b = 0; b < batch; ++b) n_new[b] = std::min<int32_t>(target[b] - cur[b], int32_t(rng() % 18));
      for (int64_t b = 0; b < batch; ++b) cur[b] += n_new[b];
      const std::vector<int32_t> cu = cu_from_lengths(n_new);
      const int64_t n = cu.back(), sk = row + 8;
      const std::vector<double> k = randn(rng, size_t(std::max<int64_t>(n, 1) * sk), 1.0, DType::bf16);
      const std::vector<double> v = randn(rng, k.size(), 1.0, DType::bf16);
      const std::vector<double> x = randn(rng, size_t(std::max<int64_t>(n, 1) * d_idx), 1.0, DType::bf16);
      Buf bk_(DType::bf16, k), bv(DType::bf16, v), bx(DType::bf16, x);
      AppendKvParams p;
      p.cache.batch = batch;
      p.cache.n_pages = n_pages;
      p.cache.bk = bk;
      p.cache.h_kv = h_kv;
      p.cache.d = d;
      p.cache.d_idx = d_idx;
      p.cache.max_blocks = max_blocks;
      p.dtype = DType::bf16;
      p.n_new = n;
      p.stride_k_tok = sk;
      p.stride_v_tok = sk;
      // CPU
      p.cache.k_cache = kc.data();
      p.cache.v_cache = vc.data();
      p.cache.k_idx_cache = with_idx ? xc.data() : nullptr;
      p.cache.block_table = table.data();
      p.cache.seq_lens = cur.data();
      p.cu_new = cu.data();
      p.k = bk_.data();
      p.v = bv.data();
      p.k_idx = with_idx ? bx.data() : nullptr;
      append_kv(p);
      // GPU
      DevBuf<int32_t> dlens(cur), dcu(cu);
      DevBuf<uint8_t> dk(bk_.bytes), dv(bv.bytes), dx(bx.bytes);
      p.cache.k_cache = dkc.ptr;
      p.cache.v_cache = dvc.ptr;
      p.cache.k_idx_cache = with_idx ? dxc.ptr : nullptr;
      p.cache.block_table = dtable.ptr;
      p.cache.seq_lens = dlens.ptr;
      p.cu_new = dcu.ptr;
      p.k = dk.ptr;
      p.v = dv.ptr;
      p.k_idx = with_idx ? dx.ptr : nullptr;
      append_kv(p, cuda_exec());
      cuda_check(cudaDeviceSynchronize(), "append_kv");
      ++steps;
    }
    EXPECT_GT(steps, 3);
    EXPECT_TRUE(bitwise_equal(dkc.get(), kc.bytes)) << "k cache, with_idx " << with_idx;
    EXPECT_TRUE(bitwise_equal(dvc.get(), vc.bytes)) << "v cache";
    EXPECT_TRUE(bitwise_equal(dxc.get(), xc.bytes)) << "index-key cache";
  }
}

#endif  // MSA_WITH_CUDA

}  // namespace
}  // namespace msa::test
