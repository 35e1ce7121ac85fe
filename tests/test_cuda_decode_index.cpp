// Tests of decode_index_topk on the CUDA backend against the CPU decode reference on the same bf16
// values: paged index-key caches with shuffled pages and NaN in every slot and page no request
// may read, odd lengths (1, 127, 129, 1023, 4097, ...) and lengths below topk * bk, 0 / 1 / 2 / 5 /
// 16 / 17 query tokens per request in one batch, bk 64 / 128, d_idx 64 / 128, topk 1 / 16 / 32,
// index_lse on and off (a NaN key inside a request: NaN lse where its block is selected), exact
// ties built on purpose (must match exactly), planned and convenience forms (bitwise equal, and
// repeated runs bitwise equal), a plan reused for shorter contexts, a long single request
// without offsets, garbage page ids (memory safety) and unsupported shapes. Selections are
// compared as sets: a difference passes only where the float64 block scores show a near-tie
// within a derived rounding bound. The FP8 index-key cache (fp8_e4m3) is tested the same way
// against the CPU's float64 scores of the same quantized values (bound: the FP8 tensor-core
// accumulation), with its block maxima checked directly, exact ties, special key rows (NaN, zero,
// tiny) and GPU append_kv bitwise equal to the CPU's. GPU tests skip with a message when no device
// is visible.
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
#include "fp8.h"
#include "test_util.h"

namespace msa::test {
namespace {

#ifndef MSA_WITH_CUDA

TEST(CudaDecodeIndex, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

struct Spec {
  int64_t bk = 128, d = 128, topk = 16, h_kv = 4;
  std::vector<int32_t> lens, nq;  // per request: tokens in the cache, query tokens of the step
  bool lse = true;
  bool null_cu = false;  // one request, cu_seqlens_q = nullptr
  int tie_req = -1;      // request whose blocks repeat three key patterns (exact ties)
  int nan_req = -1;      // request with one NaN key in a visible slot
  uint64_t seed = 1;
};

// Host copy of a paged case; the keys are also kept per request in logical order (double) for
// the float64 block scores.
struct Case {
  Spec s;
  int64_t batch = 0, n_pages = 0, max_blocks = 0, n_q = 0, stride_tok = 0, stride_head = 0;
  std::vector<uint16_t> kc;                  // [n_pages, bk, d] bf16 bits
  std::vector<std::vector<double>> keys;     // per request [len, d]
  std::vector<uint16_t> q;                   // [n_q, stride_tok] bf16 bits, padded strides
  std::vector<double> qd;                    // [n_q, h_kv, d]
  std::vector<int32_t> table, lens, cu;
};

uint16_t bits_of(double x) {
  bf16 b = float_to_bf16(float(x));
  uint16_t u;
  std::memcpy(&u, &b, 2);
  return u;
}

Case build(const Spec& s) {
  Case c;
  c.s = s;
  c.batch = int64_t(s.lens.size());
  std::mt19937_64 rng(s.seed);
  const int64_t bk = s.bk, d = s.d;
  int64_t used = 0;
  for (int32_t l : s.lens) {
    c.max_blocks = std::max<int64_t>(c.max_blocks, (l + bk - 1) / bk);
    used += (l + bk - 1) / bk;
  }
  c.max_blocks += 2;  // a table wider than any request
  c.n_pages = used + 3;  // unused pages stay NaN
  std::vector<int32_t> perm(c.n_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  c.kc.assign(size_t(c.n_pages * bk * d), bits_of(std::nan("")));
  c.table.assign(size_t(c.batch * c.max_blocks), -1);
  c.lens = s.lens;
  int64_t next = 0;
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t len = s.lens[b], nb = (len + bk - 1) / bk;
    std::vector<double> k = randn(rng, size_t(std::max<int64_t>(len, 1) * d), 1.0, DType::bf16);
    k.resize(size_t(len * d));
    if (int(b) == s.tie_req)
      for (int64_t j = 3 * bk; j < len; ++j)
        for (int64_t e = 0; e < d; ++e) k[j * d + e] = k[((j / bk) % 3 * bk + j % bk) * d + e];
    if (int(b) == s.nan_req && len > 5) k[5 * d + 7] = std::nan("");
    for (int64_t j = 0; j < nb; ++j) {
      const int32_t page = perm[next++];
      c.table[b * c.max_blocks + j] = page;
      for (int64_t t = j * bk; t < std::min<int64_t>(len, (j + 1) * bk); ++t)
        for (int64_t e = 0; e < d; ++e) c.kc[(page * bk + t % bk) * d + e] = bits_of(k[t * d + e]);
    }
    c.keys.push_back(std::move(k));
  }
  c.cu.assign(1, 0);
  for (int32_t n : s.nq) c.cu.push_back(c.cu.back() + n);
  c.n_q = c.cu.back();
  c.stride_head = d + 8;
  c.stride_tok = s.h_kv * c.stride_head + 8;
  c.qd = randn(rng, size_t(std::max<int64_t>(c.n_q, 1) * s.h_kv * d), 1.0, DType::bf16);
  c.q.assign(size_t(std::max<int64_t>(c.n_q, 1) * c.stride_tok), bits_of(std::nan("")));
  for (int64_t i = 0; i < c.n_q; ++i)
    for (int64_t r = 0; r < s.h_kv; ++r)
      for (int64_t e = 0; e < d; ++e)
        c.q[i * c.stride_tok + r * c.stride_head + e] = bits_of(c.qd[(i * s.h_kv + r) * d + e]);
  return c;
}

DecodeIndexParams params(const Case& c, const void* kc, const int32_t* table, const int32_t* lens, const int32_t* cu,
                         const void* q, int32_t* idx, float* lse) {
  DecodeIndexParams p;
  p.cache.batch = c.batch;
  p.cache.n_pages = c.n_pages;
  p.cache.bk = c.s.bk;
  p.cache.h_kv = c.s.h_kv;
  p.cache.d_idx = c.s.d;
  p.cache.k_idx_cache = const_cast<void*>(kc);
  p.cache.block_table = table;
  p.cache.max_blocks = c.max_blocks;
  p.cache.seq_lens = lens;
  p.dtype = DType::bf16;
  p.topk = c.s.topk;
  p.n_q = c.n_q;
  p.cu_seqlens_q = c.s.null_cu ? nullptr : cu;
  p.q_idx = q;
  p.stride_q_idx_tok = c.stride_tok;
  p.stride_q_idx_head = c.stride_head;
  p.topk_idx = idx;
  p.index_lse = lse;
  return p;
}

struct Out {
  std::vector<int32_t> idx;
  std::vector<float> lse;
};

Out cpu_ref(const Case& c) {
  Out o;
  o.idx.assign(size_t(c.n_q * c.s.h_kv * c.s.topk), -7);
  o.lse.assign(size_t(c.n_q * c.s.h_kv), 0.f);
  auto p = params(c, c.kc.data(), c.table.data(), c.lens.data(), c.cu.data(), c.q.data(), o.idx.data(),
                  c.s.lse ? o.lse.data() : nullptr);
  decode_index_topk(p, Exec{});
  return o;
}

// The outputs of a case (Case or Fp8Case) from its device buffers.
template <class C>
Out read_out(const C& c, DevBuf<int32_t>& idx, DevBuf<float>& lse) {
  Out o;
  o.idx = idx.get();
  o.idx.resize(size_t(c.n_q * c.s.h_kv * c.s.topk));
  if (c.s.lse) {
    o.lse = lse.get();
    o.lse.resize(size_t(c.n_q * c.s.h_kv));
  }
  return o;
}

// Device copies of a case.
struct Dev {
  DevBuf<uint16_t> kc, q;
  DevBuf<int32_t> table, lens, cu, idx;
  DevBuf<float> lse;
  explicit Dev(const Case& c)
      : kc(c.kc), q(c.q), table(c.table), lens(c.lens), cu(c.cu), idx(size_t(std::max<int64_t>(1, c.n_q * c.s.h_kv * c.s.topk))),
        lse(size_t(std::max<int64_t>(1, c.n_q * c.s.h_kv))) {}
  DecodeIndexParams params(const Case& c) {
    return test::params(c, kc.ptr, table.ptr, lens.ptr, cu.ptr, q.ptr, idx.ptr, c.s.lse ? lse.ptr : nullptr);
  }
  Out get(const Case& c) { return read_out(c, idx, lse); }
};

// The plan shape of a case (Case or Fp8Case: the same fields).
template <class C>
DecodeShape shape_of(const C& c, int64_t max_q) {
  DecodeShape s;
  s.batch = c.batch;
  s.n_q = std::max<int64_t>(1, c.n_q);
  s.max_q = max_q;
  s.max_blocks = c.max_blocks;
  s.bk = c.s.bk;
  s.h_kv = c.s.h_kv;
  s.d_idx = c.s.d;
  s.topk = c.s.topk;
  return s;
}

Exec cuda_exec() {
  Exec ex;
  ex.backend = Backend::cuda;
  return ex;
}

// Runs the planned form with a workspace of its own (C, D: Case and Dev, or Fp8Case and DevFp8);
// ws_out and plan_out (optional) receive the workspace after the run and the plan.
template <class C, class D>
Out run_planned(const C& c, D& dv, const DecodeShape& shape, std::vector<uint8_t>* ws_out = nullptr,
                DecodePlan* plan_out = nullptr) {
  const Exec ex = cuda_exec();
  DecodePlan plan = plan_decode(shape, ex);
  DevBuf<uint8_t> ws(plan.workspace_bytes);
  ws.poison(0xff);
  dv.idx.poison(0x5a);
  dv.lse.poison(0x5a);
  decode_index_topk(dv.params(c), plan, ws.ptr, ex);
  cuda_check(cudaDeviceSynchronize(), "decode_index_topk (planned)");
  if (ws_out) *ws_out = ws.get();
  if (plan_out) *plan_out = plan;
  return dv.get(c);
}

Out run_convenience(const Case& c, Dev& dv) {
  dv.idx.poison(0x33);
  dv.lse.poison(0x33);
  decode_index_topk(dv.params(c), cuda_exec());
  cuda_check(cudaDeviceSynchronize(), "decode_index_topk (convenience)");
  return dv.get(c);
}

// Position of packed token i and its request (Case or Fp8Case).
template <class C>
void token_pos(const C& c, int64_t i, int64_t& b, int64_t& pos) {
  b = 0;
  while (c.cu[b + 1] <= i) ++b;
  pos = c.lens[b] - (c.cu[b + 1] - c.cu[b]) + (i - c.cu[b]);
}

double dot(const Case& c, int64_t i, int64_t r, const std::vector<double>& k, int64_t j) {
  double acc = 0;
  for (int64_t e = 0; e < c.s.d; ++e) acc += c.qd[(i * c.s.h_kv + r) * c.s.d + e] * k[j * c.s.d + e];
  return acc;
}

// Compares a GPU result with the CPU reference. exact: selections equal as sets (no near-tie
// allowance). Reports the first failing row, the count of near-tie differences and the worst lse
// error relative to its bound.
::testing::AssertionResult compare(const Case& c, const Out& g, const Out& ref, bool exact) {
  const int64_t h = c.s.h_kv, topk = c.s.topk, bk = c.s.bk, d = c.s.d;
  const double scale = double(float(1.0 / std::sqrt(double(d))));
  int near = 0;
  double worst_lse = 0;
  for (int64_t i = 0; i < c.n_q; ++i) {
    int64_t b, pos;
    token_pos(c, i, b, pos);
    const std::vector<double>& k = c.keys[b];
    double kmax = 0;
    for (int64_t j = 0; j <= pos; ++j) {
      double kn = 0;
      for (int64_t e = 0; e < d; ++e) kn += k[j * d + e] * k[j * d + e];
      if (std::isfinite(kn)) kmax = std::max(kmax, std::sqrt(kn));
    }
    for (int64_t r = 0; r < h; ++r) {
      const int64_t row = i * h + r;
      std::ostringstream where;
      where << "row (" << i << ", " << r << ") of request " << b << " at position " << pos;
      const int32_t* gi = &g.idx[row * topk];
      const int32_t* ci = &ref.idx[row * topk];
      const int64_t own = pos / bk, n_sel = std::min<int64_t>(topk, own + 1);
      for (int64_t t = 0; t < topk; ++t) {
        const bool ok = t < n_sel ? (gi[t] >= 0 && gi[t] <= own && (t == 0 || gi[t] > gi[t - 1])) : gi[t] == -1;
        if (!ok)
          return ::testing::AssertionFailure() << where.str() << ": topk_idx[" << t << "] = " << gi[t]
                                               << " breaks the layout (" << n_sel << " ascending visible blocks, then -1)";
      }
      if (gi[n_sel - 1] != own)
        return ::testing::AssertionFailure() << where.str() << ": own block " << own << " not selected";
      double qn = 0;
      for (int64_t e = 0; e < d; ++e) qn += c.qd[row * d + e] * c.qd[row * d + e];
      // |fp32 tensor-core dot - exact| <= d * 2^-24 * |q| |k| (Cauchy-Schwarz), 8x for the
      // unspecified order inside the tensor core, times the scale.
      const double tol = scale * std::sqrt(qn) * kmax * double(d) * std::ldexp(1.0, -21) + 1e-7;
      std::vector<int32_t> gs(gi, gi + n_sel), cs(ci, ci + n_sel);
      const bool same = gs == cs;
      if (!same) {
        if (exact) return ::testing::AssertionFailure() << where.str() << ": selection differs where ties are exact";
        std::vector<double> m(size_t(own + 1), std::nan(""));  // float64 block max, NaN ignored
        for (int64_t j = 0; j <= pos; ++j) {
          const double sc = dot(c, i, r, k, j) * scale;
          double& mb = m[j / bk];
          if (!std::isnan(sc) && (std::isnan(mb) || sc > mb)) mb = sc;
        }
        for (int32_t a : gs)
          if (!std::binary_search(cs.begin(), cs.end(), a))
            for (int32_t o : cs)
              if (!std::binary_search(gs.begin(), gs.end(), o)) {
                const bool na = std::isnan(m[a]), no = std::isnan(m[o]);
                const bool ok = (na && no) ? a < o : no ? true : na ? false : m[a] >= m[o] - 2 * tol;
                if (!ok)
                  return ::testing::AssertionFailure() << where.str() << ": GPU chose block " << a << " (score " << m[a]
                                                       << ") over block " << o << " (score " << m[o]
                                                       << "), beyond the tolerance " << tol;
              }
        ++near;
      }
      if (c.s.lse) {
        double want = ref.lse[row];
        if (!same) {  // float64 logsumexp over the GPU's own selection
          std::vector<double> sv;
          for (int32_t blk : gs)
            for (int64_t j = blk * bk; j < std::min<int64_t>((blk + 1) * bk, pos + 1); ++j) sv.push_back(dot(c, i, r, k, j) * scale);
          double mx = -INFINITY;
          bool nan = false;
          for (double x : sv) nan |= std::isnan(x), mx = std::max(mx, std::isnan(x) ? mx : x);
          double sum = 0;
          for (double x : sv) sum += std::exp(x - mx);
          want = nan ? std::nan("") : mx + std::log(sum);
        }
        const double got = g.lse[row];
        if (std::isnan(want) || std::isnan(got)) {
          if (std::isnan(want) != std::isnan(got))
            return ::testing::AssertionFailure() << where.str() << ": index_lse = " << got << ", expected " << want;
          continue;
        }
        // The scores' rounding bound plus float32 exp / log / sum rounding.
        const double err = std::abs(got - want), lim = tol + 1e-5 * (1 + std::abs(want));
        worst_lse = std::max(worst_lse, err / lim);
        if (!(err <= lim))
          return ::testing::AssertionFailure()
                 << where.str() << ": index_lse = " << got << ", expected " << want << " (tolerance " << lim << ")";
      }
    }
  }
  if (near > std::max<int64_t>(2, c.n_q * h / 50))
    return ::testing::AssertionFailure() << near << " of " << c.n_q * h << " rows differ from the CPU selection";
  return ::testing::AssertionSuccess() << "near-ties " << near << ", worst lse error " << worst_lse << " of bound";
}

Spec mixed(int64_t bk, int64_t d, int64_t topk, bool lse, uint64_t seed) {
  Spec s;
  s.bk = bk;
  s.d = d;
  s.topk = topk;
  s.lse = lse;
  s.seed = seed;
  const int32_t tb = int32_t(topk * bk);
  s.lens = {1, 127, 129, 1023, 4097, tb - 1, int32_t(3 * bk + 5), 300, 20, tb + int32_t(bk), 2 * tb + 3};
  s.nq = {1, 2, 16, 0, 17, 5, 1, 8, 20, 1, 3};
  s.nan_req = 4;
  return s;
}

struct Cfg {
  int64_t bk, d, topk, h_kv;
  bool lse;
};

class CudaDecodeIndexMixed : public ::testing::TestWithParam<Cfg> {};

TEST_P(CudaDecodeIndexMixed, MatchesCpuReference) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  const Cfg g = GetParam();
  Spec s = mixed(g.bk, g.d, g.topk, g.lse, uint64_t(g.bk * 1000 + g.d * 10 + g.topk));
  s.h_kv = g.h_kv;
  const Case c = build(s);
  const Out ref = cpu_ref(c);
  Dev dv(c);
  // max_q hint 4: requests of 5..20 tokens must still be right (row chunks loop in the kernel).
  const Out a = run_planned(c, dv, shape_of(c, 4));
  EXPECT_TRUE(compare(c, a, ref, false));
  const Out a2 = run_planned(c, dv, shape_of(c, 4));
  EXPECT_TRUE(bitwise_equal(a.idx, a2.idx));
  EXPECT_TRUE(bitwise_equal(a.lse, a2.lse));
  const Out b = run_convenience(c, dv);
  EXPECT_TRUE(bitwise_equal(a.idx, b.idx)) << "convenience vs planned";
  EXPECT_TRUE(bitwise_equal(a.lse, b.lse)) << "convenience vs planned";
  // A plan for a larger shape (3x batch, 4x tokens, 2x table width, other tile count).
  DecodeShape big = shape_of(c, 16);
  big.batch *= 3;
  big.n_q *= 4;
  big.max_blocks *= 2;
  const Out e = run_planned(c, dv, big);
  EXPECT_TRUE(compare(c, e, ref, false));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaDecodeIndexMixed,
                         ::testing::Values(Cfg{128, 128, 16, 4, true}, Cfg{128, 128, 16, 4, false},
                                           Cfg{64, 64, 1, 4, true}, Cfg{64, 128, 32, 2, true},
                                           Cfg{128, 64, 32, 1, false}, Cfg{64, 64, 16, 8, true},
                                           Cfg{128, 128, 1, 3, true}));

TEST(CudaDecodeIndex, ExactTiesBreakTowardLowerBlock) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  for (int64_t bk : {64, 128}) {
    Spec s;
    s.bk = bk;
    s.d = 64;
    s.topk = 8;
    s.lens = {int32_t(40 * bk + 7), int32_t(12 * bk)};
    s.nq = {3, 1};
    s.tie_req = 0;
    s.seed = 77 + uint64_t(bk);
    const Case c = build(s);
    const Out ref = cpu_ref(c);
    Dev dv(c);
    // Only request 0 has built ties; compare it alone exactly through a one-request view.
    Out a = run_planned(c, dv, shape_of(c, 3));
    Out a0 = a, r0 = ref;
    Case c0 = c;
    c0.n_q = 3;
    a0.idx.resize(size_t(3 * s.h_kv * s.topk));
    r0.idx.resize(a0.idx.size());
    a0.lse.resize(size_t(3 * s.h_kv));
    r0.lse.resize(a0.lse.size());
    EXPECT_TRUE(compare(c0, a0, r0, true)) << "bk " << bk;
    EXPECT_TRUE(compare(c, a, ref, false)) << "bk " << bk;
  }
}

TEST(CudaDecodeIndex, PlanReusedForShorterContexts) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  Spec s = mixed(128, 128, 16, true, 5);
  Case big = build(s);
  const Exec ex = cuda_exec();
  DecodeShape shape = shape_of(big, 2);
  shape.max_blocks += 8;
  DecodePlan plan = plan_decode(shape, ex);
  DevBuf<uint8_t> ws(plan.workspace_bytes);
  for (int step = 0; step < 3; ++step) {
    Spec t = s;
    t.seed = 100 + uint64_t(step);
    for (auto& l : t.lens) l = std::max<int32_t>(l / (step + 1), 0);
    for (size_t b = 0; b < t.lens.size(); ++b) t.nq[b] = std::min(t.nq[b], t.lens[b]);
    t.nan_req = -1;
    const Case c = build(t);
    const Out ref = cpu_ref(c);
    Dev dv(c);
    dv.idx.poison(0x11);
    decode_index_topk(dv.params(c), plan, ws.ptr, ex);
    cuda_check(cudaDeviceSynchronize(), "decode_index_topk");
    EXPECT_TRUE(compare(c, dv.get(c), ref, false)) << "step " << step;
  }
}

TEST(CudaDecodeIndex, LongSingleRequestWithoutOffsets) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  Spec s;
  s.bk = 128;
  s.d = 128;
  s.topk = 16;
  s.lens = {65537};
  s.nq = {8};
  s.null_cu = true;
  s.seed = 9;
  const Case c = build(s);
  const Out ref = cpu_ref(c);
  Dev dv(c);
  EXPECT_TRUE(compare(c, run_planned(c, dv, shape_of(c, 8)), ref, false));
  EXPECT_TRUE(compare(c, run_convenience(c, dv), ref, false));
}

// Rows longer than one top-k tile (1024 blocks): a mixed batch whose longest row spans 5 tiles
// (the last partial) beside rows of 2, 1 and under 1 tile, topk 16 and 32, and a request with
// exact ties spread over 3000 blocks.
TEST(CudaDecodeIndex, LongRowsOverSeveralTiles) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  for (int64_t topk : {16, 32}) {
    Spec s;
    s.bk = 64;
    s.d = 64;
    s.h_kv = 2;
    s.topk = topk;
    s.lens = {300001, 150000, 70000, 100};
    s.nq = {3, 1, 2, 1};
    s.seed = 91 + uint64_t(topk);
    const Case c = build(s);
    const Out ref = cpu_ref(c);
    Dev dv(c);
    EXPECT_TRUE(compare(c, run_planned(c, dv, shape_of(c, 3)), ref, false)) << "topk " << topk;
    EXPECT_TRUE(compare(c, run_convenience(c, dv), ref, false)) << "topk " << topk;
  }
  Spec s;
  s.bk = 64;
  s.d = 64;
  s.topk = 8;
  s.lens = {int32_t(3000 * 64 + 5)};
  s.nq = {2};
  s.null_cu = true;
  s.tie_req = 0;
  s.seed = 5;
  const Case c = build(s);
  const Out ref = cpu_ref(c);
  Dev dv(c);
  EXPECT_TRUE(compare(c, run_planned(c, dv, shape_of(c, 2)), ref, true));
}

// Garbage page ids, lengths beyond the table and offsets out of order: results are garbage but
// nothing is read or written outside the tensors (run under compute-sanitizer memcheck).
TEST(CudaDecodeIndex, GarbageDeviceArraysStayInBounds) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  Spec s = mixed(64, 64, 16, true, 3);
  Case c = build(s);
  const Out ref = cpu_ref(c);
  std::mt19937_64 rng(4);
  for (auto& t : c.table) t = int32_t(rng() % 5 == 0 ? -int32_t(rng() % 100) : int32_t(rng() % (3 * c.n_pages)));
  for (auto& l : c.lens) l = int32_t(rng() % (3 * c.max_blocks * s.bk)) - 50;
  std::swap(c.cu[2], c.cu[5]);
  Dev dv(c);
  Out a = run_planned(c, dv, shape_of(c, 4));
  // The layout still holds per row: entries are -1 or blocks inside the table.
  for (int32_t v : a.idx) EXPECT_TRUE(v >= -1 && v < c.max_blocks) << v;
}

TEST(CudaDecodeIndex, UnsupportedShapesThrow) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  const Exec ex = cuda_exec();
  auto expect_error = [&](DecodeShape sh, const char* arg) {
    try {
      plan_decode(sh, ex);
      ADD_FAILURE() << "no error for " << arg;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(arg), std::string::npos) << e.what();
    }
  };
  DecodeShape ok;
  ok.batch = 2;
  ok.n_q = 2;
  ok.max_blocks = 4;
  ok.bk = 128;
  ok.h_kv = 4;
  ok.d_idx = 128;
  ok.topk = 16;
  EXPECT_NO_THROW(plan_decode(ok, ex));
  DecodeShape s1 = ok;
  s1.d_idx = 96;
  expect_error(s1, "d_idx");
  DecodeShape s2 = ok;
  s2.bk = 32;
  expect_error(s2, "bk");
  DecodeShape s3 = ok;
  s3.topk = kMaxTopk + 1;
  expect_error(s3, "topk");
  // The convenience form plans the call's own shape: bk = 256 is refused before any launch.
  Spec s;
  s.bk = 256;
  s.d = 64;
  s.topk = 4;
  s.lens = {300};
  s.nq = {1};
  const Case c = build(s);
  Dev dv(c);
  try {
    decode_index_topk(dv.params(c), ex);
    ADD_FAILURE() << "no error for bk = 256";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bk"), std::string::npos) << e.what();
  }
}

// ---- FP8 index-key cache (IndexKeyFormat::fp8_e4m3) ----
// The quantized values are the same on both sides (the host and device quantizers agree bit for
// bit, tested below), so a GPU score differs from the CPU's float64 one only by the tensor core's
// accumulation. Bound: the e4m3 products are exact (4-bit significands); assume a k32 MMA aligns
// its 33 terms (32 products and the accumulator) to the largest and keeps at least 13 bits below
// it (Hopper FP8 MMAs are reported to accumulate with ~14 bits, not full fp32), so each term is off
// by < 2^-13 of the largest |term| <= A (the running sum of |products|): d / 32 MMAs give
// |err| <= (d / 32) * 33 * 2^-13 * A, plus a few float32 roundings of the scale products. With
// A = index_scale * |s_q| * |s_k| * sum_e |q_e k_e| (dequantized). The tests assert it and print the
// worst observed error as a fraction of it (the kernel's mma.sync e4m3 runs as f16 HMMAs with fp32
// accumulation on sm_90, so the observed error is at the fp32 level, far inside the bound).

double fp8_acc_bound(int64_t d) { return double(d / 32) * 33.0 * std::ldexp(1.0, -13) + std::ldexp(1.0, -20); }

struct Fp8Case {
  Spec s;
  int64_t batch = 0, n_pages = 0, max_blocks = 0, n_q = 0, stride_tok = 0, stride_head = 0;
  std::vector<uint8_t> kc;                // [n_pages, bk, d] e4m3 bytes
  std::vector<float> ksc;                 // [n_pages, bk]
  std::vector<std::vector<double>> k8;    // per request [len, d]: e4m3 values (unscaled)
  std::vector<std::vector<double>> sk;    // per request [len]: scales
  std::vector<uint16_t> q;                // [n_q, stride_tok] bf16 bits
  std::vector<double> q8, sq;             // [n_q * h_kv, d] e4m3 values, [n_q * h_kv] scales
  std::vector<int32_t> table, lens, cu;
  // Exact scores of every row against its visible keys and the row's bound, computed on first use
  // by compare_fp8 (shared by the comparisons of one case).
  mutable std::vector<std::vector<double>> row_sc;
  mutable std::vector<double> row_tol;
};

// Keys: random bf16 rows, with some special rows in the request nan_req: one NaN element (scale
// NaN), an all-zero row (scale 0) and a row of values below 2^-100 (scale 0), plus rows whose
// values span subnormal e4m3 bytes. Every slot and page no request may read holds 0x7F bytes (an
// e4m3 NaN) and NaN scales, so a read of one shows up as a NaN score.
Fp8Case build_fp8(const Spec& s) {
  Fp8Case c;
  c.s = s;
  c.batch = int64_t(s.lens.size());
  std::mt19937_64 rng(s.seed);
  const int64_t bk = s.bk, d = s.d, h = s.h_kv;
  int64_t used = 0;
  for (int32_t l : s.lens) {
    c.max_blocks = std::max<int64_t>(c.max_blocks, (l + bk - 1) / bk);
    used += (l + bk - 1) / bk;
  }
  c.max_blocks += 2;
  c.n_pages = used + 3;
  std::vector<int32_t> perm(c.n_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  c.kc.assign(size_t(c.n_pages * bk * d), 0x7F);
  c.ksc.assign(size_t(c.n_pages * bk), std::numeric_limits<float>::quiet_NaN());
  c.table.assign(size_t(c.batch * c.max_blocks), -1);
  c.lens = s.lens;
  int64_t next = 0;
  std::vector<float> x(static_cast<size_t>(d));
  std::vector<uint8_t> b8(static_cast<size_t>(d));
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t len = s.lens[b], nb = (len + bk - 1) / bk;
    std::vector<double> k = randn(rng, size_t(std::max<int64_t>(len, 1) * d), 1.0, DType::bf16);
    if (int(b) == s.nan_req) {
      if (len > 5) k[5 * d + 7] = std::nan("");
      if (len > 9)
        for (int64_t e = 0; e < d; ++e) k[9 * d + e] = 0.0;
      if (len > 12)
        for (int64_t e = 0; e < d; ++e) k[12 * d + e] = double(bf16_to_float(float_to_bf16(float(k[12 * d + e] * 1e-32))));
      if (len > 14)  // one large element: the rest lands on e4m3 subnormals
        for (int64_t e = 0; e < d; ++e) k[14 * d + e] = e == 3 ? 300.0 : k[14 * d + e];
    }
    std::vector<double> kq(static_cast<size_t>(len * d)), ks(static_cast<size_t>(len));
    for (int64_t j = 0; j < nb; ++j) {
      const int32_t page = perm[next++];
      c.table[b * c.max_blocks + j] = page;
      for (int64_t t = j * bk; t < std::min<int64_t>(len, (j + 1) * bk); ++t) {
        for (int64_t e = 0; e < d; ++e) x[e] = float(k[t * d + e]);
        const float sc = quantize_e4m3_row(x.data(), d, b8.data());
        c.ksc[page * bk + t % bk] = sc;
        for (int64_t e = 0; e < d; ++e) {
          c.kc[(page * bk + t % bk) * d + e] = b8[e];
          kq[t * d + e] = double(detail::e4m3_decode(b8[e]));
        }
        ks[t] = sc;
      }
    }
    c.k8.push_back(std::move(kq));
    c.sk.push_back(std::move(ks));
  }
  c.cu.assign(1, 0);
  for (int32_t n : s.nq) c.cu.push_back(c.cu.back() + n);
  c.n_q = c.cu.back();
  c.stride_head = d + 8;
  c.stride_tok = h * c.stride_head + 8;
  std::vector<double> qd = randn(rng, size_t(std::max<int64_t>(c.n_q, 1) * h * d), 1.0, DType::bf16);
  if (c.n_q > 1)  // one all-zero query row: scale 0, all its scores 0
    for (int64_t e = 0; e < d; ++e) qd[size_t((1 * h + 0) * d + e)] = 0.0;
  c.q.assign(size_t(std::max<int64_t>(c.n_q, 1) * c.stride_tok), bits_of(std::nan("")));
  c.q8.assign(size_t(c.n_q * h * d), 0.0);
  c.sq.assign(size_t(c.n_q * h), 0.0);
  for (int64_t i = 0; i < c.n_q; ++i)
    for (int64_t r = 0; r < h; ++r) {
      for (int64_t e = 0; e < d; ++e) {
        c.q[i * c.stride_tok + r * c.stride_head + e] = bits_of(qd[(i * h + r) * d + e]);
        x[e] = float(qd[(i * h + r) * d + e]);
      }
      c.sq[i * h + r] = quantize_e4m3_row(x.data(), d, b8.data());
      for (int64_t e = 0; e < d; ++e) c.q8[(i * h + r) * d + e] = double(detail::e4m3_decode(b8[e]));
    }
  return c;
}

DecodeIndexParams params_fp8(const Fp8Case& c, const void* kc, const float* ksc, const int32_t* table,
                             const int32_t* lens, const int32_t* cu, const void* q, int32_t* idx, float* lse) {
  DecodeIndexParams p;
  p.cache.batch = c.batch;
  p.cache.n_pages = c.n_pages;
  p.cache.bk = c.s.bk;
  p.cache.h_kv = c.s.h_kv;
  p.cache.d_idx = c.s.d;
  p.cache.k_idx_cache = const_cast<void*>(kc);
  p.cache.k_idx_format = IndexKeyFormat::fp8_e4m3;
  p.cache.k_idx_scale = const_cast<float*>(ksc);
  p.cache.block_table = table;
  p.cache.max_blocks = c.max_blocks;
  p.cache.seq_lens = lens;
  p.dtype = DType::bf16;
  p.topk = c.s.topk;
  p.n_q = c.n_q;
  p.cu_seqlens_q = c.s.null_cu ? nullptr : cu;
  p.q_idx = q;
  p.stride_q_idx_tok = c.stride_tok;
  p.stride_q_idx_head = c.stride_head;
  p.topk_idx = idx;
  p.index_lse = lse;
  return p;
}

Out cpu_ref_fp8(const Fp8Case& c) {
  Out o;
  o.idx.assign(size_t(c.n_q * c.s.h_kv * c.s.topk), -7);
  o.lse.assign(size_t(c.n_q * c.s.h_kv), 0.f);
  auto p = params_fp8(c, c.kc.data(), c.ksc.data(), c.table.data(), c.lens.data(), c.cu.data(), c.q.data(),
                      o.idx.data(), c.s.lse ? o.lse.data() : nullptr);
  decode_index_topk(p, Exec{});
  return o;
}

struct DevFp8 {
  DevBuf<uint8_t> kc;
  DevBuf<float> ksc;
  DevBuf<uint16_t> q;
  DevBuf<int32_t> table, lens, cu, idx;
  DevBuf<float> lse;
  explicit DevFp8(const Fp8Case& c)
      : kc(c.kc), ksc(c.ksc), q(c.q), table(c.table), lens(c.lens), cu(c.cu),
        idx(size_t(std::max<int64_t>(1, c.n_q * c.s.h_kv * c.s.topk))), lse(size_t(std::max<int64_t>(1, c.n_q * c.s.h_kv))) {}
  DecodeIndexParams params(const Fp8Case& c) {
    return params_fp8(c, kc.ptr, ksc.ptr, table.ptr, lens.ptr, cu.ptr, q.ptr, idx.ptr, c.s.lse ? lse.ptr : nullptr);
  }
  Out get(const Fp8Case& c) { return read_out(c, idx, lse); }
};

DecodeShape shape_fp8(const Fp8Case& c, int64_t max_q) {
  DecodeShape s = shape_of(c, max_q);
  s.k_idx_format = IndexKeyFormat::fp8_e4m3;
  return s;
}


// Exact (float64) score of row (i, r) against key j of request b, and its accumulation bound.
struct Fp8Score {
  double s, tol;
};
Fp8Score fp8_score(const Fp8Case& c, int64_t i, int64_t r, int64_t b, int64_t j) {
  const int64_t d = c.s.d, row = i * c.s.h_kv + r;
  const double scale = double(float(1.0 / std::sqrt(double(d))));
  const double* q = &c.q8[size_t(row * d)];
  const double* k = &c.k8[size_t(b)][size_t(j * d)];
  double acc = 0, abs_acc = 0;
  for (int64_t e = 0; e < d; ++e) acc += q[e] * k[e], abs_acc += std::abs(q[e] * k[e]);
  const double f = scale * c.sq[size_t(row)] * c.sk[size_t(b)][size_t(j)];
  return {acc * f, std::abs(f) * abs_acc * fp8_acc_bound(d) + 1e-30};
}

// Selections as sets (a difference passes only where the exact block maxima are within twice the
// row's bound, and on at most 2% of the rows), the layout, the own block, and index_lse within the
// bound plus float32 rounding (against float64 over the GPU's own selection where it differs).
::testing::AssertionResult compare_fp8(const Fp8Case& c, const Out& g, const Out& ref) {
  const int64_t h = c.s.h_kv, topk = c.s.topk, bk = c.s.bk;
  int near = 0;
  double worst_lse = 0;
  for (int64_t i = 0; i < c.n_q; ++i) {
    int64_t b, pos;
    token_pos(c, i, b, pos);
    for (int64_t r = 0; r < h; ++r) {
      const int64_t row = i * h + r;
      std::ostringstream where;
      where << "fp8 row (" << i << ", " << r << ") of request " << b << " at position " << pos;
      const int32_t* gi = &g.idx[row * topk];
      const int32_t* ci = &ref.idx[row * topk];
      const int64_t own = pos / bk, n_sel = std::min<int64_t>(topk, own + 1);
      for (int64_t t = 0; t < topk; ++t) {
        const bool ok = t < n_sel ? (gi[t] >= 0 && gi[t] <= own && (t == 0 || gi[t] > gi[t - 1])) : gi[t] == -1;
        if (!ok)
          return ::testing::AssertionFailure() << where.str() << ": topk_idx[" << t << "] = " << gi[t]
                                               << " breaks the layout (" << n_sel << " ascending visible blocks, then -1)";
      }
      if (gi[n_sel - 1] != own)
        return ::testing::AssertionFailure() << where.str() << ": own block " << own << " not selected";
      if (c.row_sc.empty()) {
        c.row_sc.resize(size_t(c.n_q * h));
        c.row_tol.assign(size_t(c.n_q * h), 0.0);
      }
      std::vector<double>& sc = c.row_sc[size_t(row)];
      double& tol = c.row_tol[size_t(row)];
      if (sc.empty()) {
        sc.resize(size_t(pos + 1));
        for (int64_t j = 0; j <= pos; ++j) {
          const Fp8Score f = fp8_score(c, i, r, b, j);
          sc[size_t(j)] = f.s;
          if (std::isfinite(f.tol)) tol = std::max(tol, f.tol);
        }
      }
      std::vector<int32_t> gs(gi, gi + n_sel), cs(ci, ci + n_sel);
      const bool same = gs == cs;
      if (!same) {
        std::vector<double> m(size_t(own + 1), std::nan(""));
        for (int64_t j = 0; j <= pos; ++j) {
          double& mb = m[size_t(j / bk)];
          if (!std::isnan(sc[size_t(j)]) && (std::isnan(mb) || sc[size_t(j)] > mb)) mb = sc[size_t(j)];
        }
        for (int32_t a : gs)
          if (!std::binary_search(cs.begin(), cs.end(), a))
            for (int32_t o : cs)
              if (!std::binary_search(gs.begin(), gs.end(), o)) {
                const bool na = std::isnan(m[a]), no = std::isnan(m[o]);
                const bool ok = (na && no) ? a < o : no ? true : na ? false : m[a] >= m[o] - 2 * tol;
                if (!ok)
                  return ::testing::AssertionFailure() << where.str() << ": GPU chose block " << a << " (score " << m[a]
                                                       << ") over block " << o << " (score " << m[o]
                                                       << "), beyond the tolerance " << tol;
              }
        ++near;
      }
      if (c.s.lse) {
        double want = ref.lse[row];
        if (!same) {
          double mx = -INFINITY;
          bool nan = false;
          for (int32_t blk : gs)
            for (int64_t j = blk * bk; j < std::min<int64_t>((blk + 1) * bk, pos + 1); ++j)
              nan |= std::isnan(sc[size_t(j)]), mx = std::isnan(sc[size_t(j)]) ? mx : std::max(mx, sc[size_t(j)]);
          double sum = 0;
          for (int32_t blk : gs)
            for (int64_t j = blk * bk; j < std::min<int64_t>((blk + 1) * bk, pos + 1); ++j)
              if (!std::isnan(sc[size_t(j)])) sum += std::exp(sc[size_t(j)] - mx);
          want = nan ? std::nan("") : mx + std::log(sum);
        }
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
  }
  if (near > std::max<int64_t>(2, c.n_q * h / 50))
    return ::testing::AssertionFailure() << near << " of " << c.n_q * h << " fp8 rows differ from the CPU selection";
  std::cout << "[ fp8 ] " << c.n_q * h << " rows: near-ties " << near << ", worst lse error " << worst_lse
            << " of bound\n";
  return ::testing::AssertionSuccess();
}

class CudaDecodeIndexFp8Mixed : public ::testing::TestWithParam<Cfg> {};

TEST_P(CudaDecodeIndexFp8Mixed, MatchesCpuReference) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  const Cfg g = GetParam();
  Spec s = mixed(g.bk, g.d, g.topk, g.lse, uint64_t(g.bk * 1000 + g.d * 10 + g.topk + 7));
  s.h_kv = g.h_kv;
  const Fp8Case c = build_fp8(s);
  const Out ref = cpu_ref_fp8(c);
  DevFp8 dv(c);
  // Hints 1 (one n8 tile per pass: the usual step, here looping over up to 20 tokens), 4 and 16
  // (2..8 tiles), and the convenience form.
  const Out a = run_planned(c, dv, shape_fp8(c, 1));
  EXPECT_TRUE(compare_fp8(c, a, ref)) << "hint 1";
  const Out a2 = run_planned(c, dv, shape_fp8(c, 1));
  EXPECT_TRUE(bitwise_equal(a.idx, a2.idx));
  EXPECT_TRUE(bitwise_equal(a.lse, a2.lse));
  const Out a4 = run_planned(c, dv, shape_fp8(c, 4));
  EXPECT_TRUE(compare_fp8(c, a4, ref)) << "hint 4";
  DecodeShape big = shape_fp8(c, 16);
  big.batch *= 3;
  big.n_q *= 4;
  big.max_blocks *= 2;
  EXPECT_TRUE(compare_fp8(c, run_planned(c, dv, big), ref)) << "hint 16, larger plan";
  dv.idx.poison(0x33);
  dv.lse.poison(0x33);
  decode_index_topk(dv.params(c), cuda_exec());
  cuda_check(cudaDeviceSynchronize(), "decode_index_topk (convenience, fp8)");
  EXPECT_TRUE(compare_fp8(c, dv.get(c), ref)) << "convenience";
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaDecodeIndexFp8Mixed,
                         ::testing::Values(Cfg{128, 128, 16, 4, true}, Cfg{128, 128, 16, 4, false},
                                           Cfg{64, 64, 1, 4, true}, Cfg{64, 128, 32, 2, true},
                                           Cfg{128, 64, 32, 1, false}, Cfg{64, 64, 16, 8, true},
                                           Cfg{128, 128, 1, 3, true}, Cfg{64, 128, 16, 4, true}));

// The block maxima the score kernel leaves in its workspace (white box: ws_m is the index pass's
// first matrix, [n_q * h_kv, cache.max_blocks]) against the exact float64 maxima of the quantized
// values: every visible block of every row, |error| within the accumulation bound of its keys.
// Prints the worst error as a fraction of the bound and relative to the block's score scale.
TEST(CudaDecodeIndexFp8, BlockScoresWithinAccumulationBound) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  for (int64_t d : {64, 128})
    for (int64_t bk : {64, 128}) {
      Spec s;
      s.bk = bk;
      s.d = d;
      s.topk = 16;
      s.lens = {4097, 129, 1};
      s.nq = {3, 2, 1};
      s.nan_req = 0;
      s.seed = 300 + uint64_t(d + bk);
      const Fp8Case c = build_fp8(s);
      DevFp8 dv(c);
      std::vector<uint8_t> ws;
      DecodePlan plan;
      run_planned(c, dv, shape_fp8(c, 1), &ws, &plan);
      const float* m = reinterpret_cast<const float*>(ws.data() + plan.index_workspace_offset);
      double worst = 0, worst_rel = 0;
      int64_t checked = 0;
      for (int64_t i = 0; i < c.n_q; ++i) {
        int64_t b, pos;
        token_pos(c, i, b, pos);
        for (int64_t r = 0; r < s.h_kv; ++r)
          for (int64_t blk = 0; blk <= pos / bk; ++blk) {
            double want = std::nan(""), tol = 0, mag = 0;
            for (int64_t j = blk * bk; j <= std::min<int64_t>(pos, (blk + 1) * bk - 1); ++j) {
              const Fp8Score f = fp8_score(c, i, r, b, j);
              if (std::isnan(f.s)) continue;
              if (std::isnan(want) || f.s > want) want = f.s;
              tol = std::max(tol, f.tol);
              mag = std::max(mag, f.tol / fp8_acc_bound(d));
            }
            const double got = m[(i * s.h_kv + r) * c.max_blocks + blk];
            if (std::isnan(want)) {
              EXPECT_TRUE(std::isnan(got)) << "block " << blk << " of row (" << i << ", " << r << "): " << got;
              continue;
            }
            const double err = std::abs(got - want);
            ASSERT_LE(err, tol) << "d " << d << " bk " << bk << " block " << blk << " of row (" << i << ", " << r
                                << "): " << got << " vs exact " << want;
            worst = std::max(worst, err / tol);
            if (mag > 0) worst_rel = std::max(worst_rel, err / mag);
            ++checked;
          }
      }
      std::cout << "[ fp8 ] d " << d << " bk " << bk << ": " << checked << " block maxima, worst error " << worst
                << " of the bound, " << worst_rel << " of the block's largest sum |q_e k_e| x scales\n";
    }
}

// Exact ties (repeated key patterns) break toward the lower block as on the CPU: the repeated
// keys have equal bytes and scales, so their GPU scores are equal too.
TEST(CudaDecodeIndexFp8, ExactTiesBreakTowardLowerBlock) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  for (int64_t bk : {64, 128}) {
    Spec s;
    s.bk = bk;
    s.d = 128;
    s.topk = 8;
    s.lens = {int32_t(40 * bk + 7)};
    s.nq = {3};
    s.seed = 88 + uint64_t(bk);
    Fp8Case c = build_fp8(s);
    // Blocks 3.. repeat blocks 0..2 (bytes and scales), in the pages and the exact copies.
    for (int64_t j = 3 * bk; j < c.lens[0]; ++j) {
      const int64_t src = (j / bk) % 3 * bk + j % bk;
      const int32_t ps = c.table[src / bk], pd = c.table[j / bk];
      for (int64_t e = 0; e < s.d; ++e) {
        c.kc[(pd * bk + j % bk) * s.d + e] = c.kc[(ps * bk + src % bk) * s.d + e];
        c.k8[0][j * s.d + e] = c.k8[0][src * s.d + e];
      }
      c.ksc[pd * bk + j % bk] = c.ksc[ps * bk + src % bk];
      c.sk[0][j] = c.sk[0][src];
    }
    const Out ref = cpu_ref_fp8(c);
    DevFp8 dv(c);
    const Out a = run_planned(c, dv, shape_fp8(c, 3));
    EXPECT_TRUE(bitwise_equal(a.idx, ref.idx)) << "bk " << bk;
    EXPECT_TRUE(compare_fp8(c, a, ref)) << "bk " << bk;
  }
}

TEST(CudaDecodeIndexFp8, LongSingleRequestWithoutOffsets) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  Spec s;
  s.bk = 128;
  s.d = 128;
  s.topk = 16;
  s.lens = {65537};
  s.nq = {2};
  s.null_cu = true;
  s.seed = 19;
  const Fp8Case c = build_fp8(s);
  const Out ref = cpu_ref_fp8(c);
  DevFp8 dv(c);
  EXPECT_TRUE(compare_fp8(c, run_planned(c, dv, shape_fp8(c, 2)), ref));
}

TEST(CudaDecodeIndexFp8, GarbageDeviceArraysStayInBounds) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  Spec s = mixed(64, 128, 16, true, 13);
  Fp8Case c = build_fp8(s);
  std::mt19937_64 rng(14);
  for (auto& t : c.table) t = int32_t(rng() % 5 == 0 ? -int32_t(rng() % 100) : int32_t(rng() % (3 * c.n_pages)));
  for (auto& l : c.lens) l = int32_t(rng() % (3 * c.max_blocks * s.bk)) - 50;
  std::swap(c.cu[2], c.cu[5]);
  DevFp8 dv(c);
  Out a = run_planned(c, dv, shape_fp8(c, 1));
  for (int32_t v : a.idx) EXPECT_TRUE(v >= -1 && v < c.max_blocks) << v;
  a = run_planned(c, dv, shape_fp8(c, 16));
  for (int32_t v : a.idx) EXPECT_TRUE(v >= -1 && v < c.max_blocks) << v;
}

// append_kv into an fp8 index-key cache on the GPU equals the CPU's append bit for bit (bytes and
// scales, the untouched slots included): random rows, and rows with a NaN, an infinity, all
// zeros, values below 2^-100, values just above it, a row whose max is hit by both signs (bytes
// +-448), bf16 subnormals beside a normal max, and e4m3 rounding midpoints. d_idx 64, 128 and 96.
TEST(CudaDecodeAppendFp8, MatchesCpuBitwise) {
  REQUIRE_CUDA_BUILD();
  REQUIRE_GPU();
  for (int64_t d_idx : {64, 128, 96}) {
    const int64_t bk = 16 * (d_idx == 64 ? 4 : 8), h_kv = 2, d = 64;
    const std::vector<int32_t> nn = {1, 16, 5, 37};  // new tokens per request
    const std::vector<int32_t> before = {0, 100, int32_t(bk - 2), 3};
    const int64_t batch = int64_t(nn.size());
    std::vector<int32_t> lens(static_cast<size_t>(batch)), cu(1, 0);
    int64_t max_blocks = 0;
    for (int64_t b = 0; b < batch; ++b) {
      lens[b] = before[b] + nn[b];
      cu.push_back(cu.back() + nn[b]);
      max_blocks = std::max<int64_t>(max_blocks, (lens[b] + bk - 1) / bk);
    }
    const int64_t n_new = cu.back(), n_pages = batch * max_blocks + 2;
    std::mt19937_64 rng(uint64_t(500 + d_idx));
    std::vector<int32_t> perm(static_cast<size_t>(n_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> table(size_t(batch * max_blocks), -1);
    for (int64_t b = 0, nx = 0; b < batch; ++b)
      for (int64_t j = 0; j < (lens[b] + bk - 1) / bk; ++j) table[b * max_blocks + j] = perm[size_t(nx++)];
    // k_idx rows (bf16, row stride d_idx + 8).
    const int64_t xs = d_idx + 8;
    std::vector<double> xv = randn(rng, size_t(n_new * xs), 1.0, DType::bf16);
    auto row = [&](int64_t t) { return &xv[size_t(t * xs)]; };
    const double tiny_lo = std::ldexp(1.0, -104), tiny_hi = std::ldexp(1.0, -98);
    for (int64_t e = 0; e < d_idx; ++e) {
      row(1)[e] = e == 3 ? std::nan("") : row(1)[e];
      row(2)[e] = e == 5 ? INFINITY : row(2)[e];
      row(3)[e] = 0.0;
      row(4)[e] = row(4)[e] * tiny_lo;        // max below 2^-100: scale 0
      row(5)[e] = row(5)[e] * tiny_hi;        // just above: quantized with inv ~ 2^107
      row(6)[e] = e == 0 ? 3.5 : e == 1 ? -3.5 : row(6)[e];  // +-448 bytes
      row(7)[e] = e == 0 ? 1.0 : std::ldexp(1.0, -130) * double(e % 7);  // bf16 subnormals
      // e4m3 midpoints at max 448: x * 448 / 448 = x, halfway between representable values.
      row(8)[e] = e == 0 ? 448.0 : (e % 2 ? 1.0 : -1.0) * (1.0 + 1.0 / 16 + (e % 4) / 8.0);
      row(9)[e] = e == 0 ? -448.0 : (e % 2 ? 1.0 : -1.0) * std::ldexp(1.0, -10) * double(e % 5);
    }
    for (auto& v : xv) v = double(bf16_to_float(float_to_bf16(float(v))));
    std::vector<uint16_t> xb(xv.size());
    for (size_t e = 0; e < xv.size(); ++e) xb[e] = bits_of(xv[e]);
    std::vector<uint16_t> kv(static_cast<size_t>(n_new * h_kv * d));
    for (auto& u : kv) u = bits_of(double(rng() % 1000) / 100.0);
    // Both caches start equal: 0x7F bytes, NaN scales, zero K/V.
    std::vector<uint8_t> x8(size_t(n_pages * bk * d_idx), 0x7F);
    std::vector<float> xsc(size_t(n_pages * bk), std::numeric_limits<float>::quiet_NaN());
    std::vector<uint16_t> kcache(size_t(n_pages * bk * h_kv * d), 0), vcache(kcache.size(), 0);
    DevBuf<uint8_t> g8(x8);
    DevBuf<float> gsc(xsc);
    DevBuf<uint16_t> gk(kcache), gv(kcache), gkin(kv), gxin(xb);
    DevBuf<int32_t> gtable(table), glens(lens), gcu(cu);
    auto make = [&](void* kc, void* vc, void* x8p, float* scp, const int32_t* tp, const int32_t* lp, const int32_t* cp,
                    const void* kin, const void* xin) {
      AppendKvParams p;
      p.cache.batch = batch;
      p.cache.n_pages = n_pages;
      p.cache.bk = bk;
      p.cache.h_kv = h_kv;
      p.cache.d = d;
      p.cache.d_idx = d_idx;
      p.cache.k_cache = kc;
      p.cache.v_cache = vc;
      p.cache.k_idx_cache = x8p;
      p.cache.k_idx_format = IndexKeyFormat::fp8_e4m3;
      p.cache.k_idx_scale = scp;
      p.cache.block_table = tp;
      p.cache.max_blocks = max_blocks;
      p.cache.seq_lens = lp;
      p.dtype = DType::bf16;
      p.n_new = n_new;
      p.cu_new = cp;
      p.k = kin;
      p.stride_k_tok = h_kv * d;
      p.stride_k_head = d;
      p.v = kin;
      p.stride_v_tok = h_kv * d;
      p.stride_v_head = d;
      p.k_idx = xin;
      p.stride_k_idx_tok = xs;
      return p;
    };
    append_kv(make(kcache.data(), vcache.data(), x8.data(), xsc.data(), table.data(), lens.data(), cu.data(), kv.data(),
                   xb.data()),
              Exec{});
    append_kv(make(gk.ptr, gv.ptr, g8.ptr, gsc.ptr, gtable.ptr, glens.ptr, gcu.ptr, gkin.ptr, gxin.ptr), cuda_exec());
    cuda_check(cudaDeviceSynchronize(), "append_kv (fp8)");
    const std::vector<uint8_t> got8 = g8.get();
    const std::vector<float> gotsc = gsc.get();
    EXPECT_TRUE(bitwise_equal(got8, x8)) << "d_idx " << d_idx << ": index-key bytes";
    EXPECT_EQ(0, std::memcmp(gotsc.data(), xsc.data(), xsc.size() * 4)) << "d_idx " << d_idx << ": scales";
    for (size_t e = 0; e < xsc.size(); ++e)
      if (std::memcmp(&gotsc[e], &xsc[e], 4) != 0) {
        ADD_FAILURE() << "d_idx " << d_idx << ": scale of slot " << e << " = " << gotsc[e] << ", CPU " << xsc[e];
        break;
      }
    for (size_t e = 0; e < x8.size(); ++e)
      if (got8[e] != x8[e]) {
        ADD_FAILURE() << "d_idx " << d_idx << ": byte " << e << " = " << int(got8[e]) << ", CPU " << int(x8[e]);
        break;
      }
    EXPECT_TRUE(bitwise_equal(gk.get(), kcache)) << "d_idx " << d_idx << ": k cache";
    // The special rows really took the intended paths on the CPU side.
    auto scale_of = [&](int64_t t) {
      int64_t b = 0;
      while (cu[b + 1] <= t) ++b;
      const int64_t pos = lens[b] - nn[b] + (t - cu[b]);
      return xsc[size_t(table[b * max_blocks + pos / bk] * bk + pos % bk)];
    };
    EXPECT_TRUE(std::isnan(scale_of(1)) && std::isnan(scale_of(2)));
    EXPECT_EQ(scale_of(3), 0.f);
    EXPECT_EQ(scale_of(4), 0.f);
    EXPECT_GT(scale_of(5), 0.f);
    EXPECT_EQ(scale_of(8), 1.f);
  }
}

#endif  // MSA_WITH_CUDA

}  // namespace
}  // namespace msa::test
