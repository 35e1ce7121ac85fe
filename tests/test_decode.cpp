// Tests of decode over a paged KV cache (append_kv, decode_index_topk, decode_attention): decode
// equals the prefill calls on the last tokens of the same sequences, append equals a cache written
// by hand, and bad arguments throw msa::Error naming the argument.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "fp8.h"
#include "msa/msa.h"
#include "test_util.h"

namespace msa::test {
namespace {

struct Dims {
  DType dtype = DType::f32;
  int64_t h_q = 4, h_kv = 2, d = 64, d_idx = 32, bk = 64, topk = 4;
};

// Sequences of given lengths (all tokens in the cache) whose last nq[b] tokens are the queries,
// both in the packed prefill layout and in a paged cache whose pages are shuffled in the pool.
// Pages no block uses, and the slots of the last page past seq_lens, hold NaN: a decode that read
// them would differ from the prefill, which never sees them.
struct PagedCase {
  Dims dm;
  std::vector<int32_t> lens, nq, cu_k, cu_q;
  std::vector<double> k, v, kidx, q, qidx;  // prefill layout, values rounded to dtype
  int64_t n_pages = 0, max_blocks = 0;
  std::vector<int32_t> table;  // [batch, max_blocks], -1 where unused
  Buf kc, vc, xc;              // the cache pool

  PagedCase(const Dims& d_, std::vector<int32_t> lens_, std::vector<int32_t> nq_, uint64_t seed)
      : dm(d_), lens(std::move(lens_)), nq(std::move(nq_)) {
    std::mt19937_64 rng(seed);
    const int64_t batch = int64_t(lens.size());
    for (int64_t b = 0; b < batch; ++b) nq[b] = std::min(nq[b], lens[b]);
    cu_k = cu_from_lengths(lens);
    cu_q = cu_from_lengths(nq);
    const int64_t n_k = cu_k.back(), n_q = cu_q.back();
    k = randn(rng, n_k * dm.h_kv * dm.d, 1.0, dm.dtype);
    v = randn(rng, n_k * dm.h_kv * dm.d, 1.0, dm.dtype);
    kidx = randn(rng, n_k * dm.d_idx, 1.0, dm.dtype);
    q = randn(rng, n_q * dm.h_q * dm.d, 1.0, dm.dtype);
    qidx = randn(rng, n_q * dm.h_kv * dm.d_idx, 1.0, dm.dtype);

    // Requests without queries get no pages: their table rows are never read.
    int64_t used = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t nb = (lens[b] + dm.bk - 1) / dm.bk;
      max_blocks = std::max(max_blocks, nb + 2);
      if (nq[b] > 0) used += nb;
    }
    n_pages = used + 5;
    std::vector<int32_t> perm(n_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    table.assign(batch * max_blocks, -1);
    int64_t next = 0;
    for (int64_t b = 0; b < batch; ++b)
      if (nq[b] > 0)
        for (int64_t j = 0; j < (lens[b] + dm.bk - 1) / dm.bk; ++j) table[b * max_blocks + j] = perm[next++];
    kc = Buf(dm.dtype, size_t(n_pages * dm.bk * dm.h_kv * dm.d));
    vc = Buf(dm.dtype, kc.size());
    xc = Buf(dm.dtype, size_t(n_pages * dm.bk * dm.d_idx));
    kc.poison();
    vc.poison();
    xc.poison();
  }

  int64_t batch() const { return int64_t(lens.size()); }

  // Writes positions [0, upto[b]) of every request that has pages into the cache, element by element.
  void write_by_hand(const std::vector<int32_t>& upto) {
    const int64_t row = dm.h_kv * dm.d;
    for (int64_t b = 0; b < batch(); ++b)
      for (int64_t pos = 0; pos < upto[b]; ++pos) {
        const int32_t page = table[b * max_blocks + pos / dm.bk];
        if (page < 0) continue;
        const int64_t slot = (page * dm.bk + pos % dm.bk), src = cu_k[b] + pos;
        for (int64_t e = 0; e < row; ++e) {
          kc.set(slot * row + e, k[src * row + e]);
          vc.set(slot * row + e, v[src * row + e]);
        }
        for (int64_t e = 0; e < dm.d_idx; ++e) xc.set(slot * dm.d_idx + e, kidx[src * dm.d_idx + e]);
      }
  }

  PagedKvCache cache(const int32_t* seq_lens) {
    PagedKvCache c;
    c.batch = batch();
    c.n_pages = n_pages;
    c.bk = dm.bk;
    c.h_kv = dm.h_kv;
    c.d = dm.d;
    c.d_idx = dm.d_idx;
    c.k_cache = kc.data();
    c.v_cache = vc.data();
    c.k_idx_cache = xc.data();
    c.block_table = table.data();
    c.max_blocks = max_blocks;
    c.seq_lens = seq_lens;
    return c;
  }
};

struct Outputs {
  std::vector<int32_t> topk_idx;
  std::vector<float> index_lse, lse;
  Buf o;
};

// The prefill calls on the packed sequences, queries at the last positions.
Outputs run_prefill(const PagedCase& pc) {
  const Dims& dm = pc.dm;
  const int64_t n_q = pc.cu_q.back(), n_k = pc.cu_k.back();
  Buf q(dm.dtype, pc.q), k(dm.dtype, pc.k), v(dm.dtype, pc.v), qidx(dm.dtype, pc.qidx), kidx(dm.dtype, pc.kidx);
  Outputs out;
  out.topk_idx.assign(n_q * dm.h_kv * dm.topk, -7);
  out.index_lse.assign(n_q * dm.h_kv, 0.f);
  out.lse.assign(n_q * dm.h_q, 0.f);
  out.o = Buf(dm.dtype, size_t(n_q * dm.h_q * dm.d));
  Varlen seq;
  seq.n_q = n_q;
  seq.n_k = n_k;
  seq.batch = pc.batch();
  seq.cu_seqlens_q = pc.cu_q.data();
  seq.cu_seqlens_k = pc.cu_k.data();

  IndexTopkParams ip;
  ip.seq = seq;
  ip.h_kv = dm.h_kv;
  ip.d_idx = dm.d_idx;
  ip.bk = dm.bk;
  ip.topk = dm.topk;
  ip.dtype = dm.dtype;
  ip.q_idx = qidx.data();
  ip.k_idx = kidx.data();
  ip.topk_idx = out.topk_idx.data();
  ip.index_lse = out.index_lse.data();
  index_topk(ip);

  AttentionParams ap;
  ap.seq = seq;
  ap.h_q = dm.h_q;
  ap.h_kv = dm.h_kv;
  ap.d = dm.d;
  ap.dtype = dm.dtype;
  ap.q = q.data();
  ap.k = k.data();
  ap.v = v.data();
  ap.topk_idx = out.topk_idx.data();
  ap.topk = dm.topk;
  ap.bk = dm.bk;
  ap.o = out.o.data();
  ap.lse = out.lse.data();
  sparse_attention_forward(ap);
  return out;
}

DecodeIndexParams index_params(PagedCase& pc, const int32_t* seq_lens, const Buf& qidx, Outputs& out) {
  DecodeIndexParams p;
  p.cache = pc.cache(seq_lens);
  p.dtype = pc.dm.dtype;
  p.topk = pc.dm.topk;
  p.n_q = pc.cu_q.back();
  p.cu_seqlens_q = pc.cu_q.data();
  p.q_idx = qidx.data();
  p.topk_idx = out.topk_idx.data();
  p.index_lse = out.index_lse.data();
  return p;
}

DecodeAttentionParams attention_params(PagedCase& pc, const int32_t* seq_lens, const Buf& q, Outputs& out) {
  DecodeAttentionParams p;
  p.cache = pc.cache(seq_lens);
  p.dtype = pc.dm.dtype;
  p.h_q = pc.dm.h_q;
  p.n_q = pc.cu_q.back();
  p.cu_seqlens_q = pc.cu_q.data();
  p.q = q.data();
  p.topk_idx = out.topk_idx.data();
  p.topk = pc.dm.topk;
  p.o = out.o.data();
  p.lse = out.lse.data();
  return p;
}

// The decode calls on the cache; q and q_idx get padded token strides to exercise them.
Outputs run_decode(PagedCase& pc) {
  const Dims& dm = pc.dm;
  const int64_t n_q = pc.cu_q.back();
  const int64_t sq = dm.h_q * dm.d + 8, sqi = dm.h_kv * dm.d_idx + 3;
  Buf q(dm.dtype, size_t(std::max<int64_t>(n_q, 1) * sq)), qidx(dm.dtype, size_t(std::max<int64_t>(n_q, 1) * sqi));
  q.poison();
  qidx.poison();
  for (int64_t i = 0; i < n_q; ++i) {
    for (int64_t e = 0; e < dm.h_q * dm.d; ++e) q.set(i * sq + e, pc.q[i * dm.h_q * dm.d + e]);
    for (int64_t e = 0; e < dm.h_kv * dm.d_idx; ++e) qidx.set(i * sqi + e, pc.qidx[i * dm.h_kv * dm.d_idx + e]);
  }
  Outputs out;
  out.topk_idx.assign(n_q * dm.h_kv * dm.topk, -7);
  out.index_lse.assign(n_q * dm.h_kv, 0.f);
  out.lse.assign(n_q * dm.h_q, 0.f);
  out.o = Buf(dm.dtype, size_t(n_q * dm.h_q * dm.d));
  out.o.poison();

  DecodeIndexParams ip = index_params(pc, pc.lens.data(), qidx, out);
  ip.stride_q_idx_tok = sqi;
  decode_index_topk(ip);
  DecodeAttentionParams ap = attention_params(pc, pc.lens.data(), q, out);
  ap.stride_q_tok = sq;
  decode_attention(ap);
  return out;
}

std::vector<double> as_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }

// decode == prefill: the same code runs on the same values in the same order, so topk_idx must be
// bitwise equal and o / lse equal to float32 rounding (kept as a small tolerance, not assumed bitwise).
void expect_same(const Outputs& got, const Outputs& ref, DType dt) {
  EXPECT_EQ(got.topk_idx, ref.topk_idx);
  const double tol_o = dt == DType::bf16 ? 4e-3 : 1e-6;
  EXPECT_TRUE(allclose(as_double(got.index_lse), as_double(ref.index_lse), 1e-6, 1e-6, "index_lse"));
  EXPECT_TRUE(allclose(as_double(got.lse), as_double(ref.lse), 1e-6, 1e-6, "lse"));
  EXPECT_TRUE(allclose(got.o.to_double(), ref.o.to_double(), tol_o, tol_o, "o"));
}

struct DecodeCase {
  DType dtype;
  int64_t bk, topk;
};

class DecodeVsPrefill : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(DecodeVsPrefill, LastTokensOfMixedBatch) {
  const DecodeCase c = GetParam();
  Dims dm;
  dm.dtype = c.dtype;
  dm.bk = c.bk;
  dm.topk = c.topk;
  const int32_t bk = int32_t(c.bk), kb = int32_t(c.topk * c.bk);
  // Odd lengths around a page, below and above topk * bk, one request without queries.
  std::vector<int32_t> lens = {1, bk - 1, bk, bk + 1, kb - 1, 2 * bk + 7, 3 * kb + 5, 50, kb + bk};
  std::vector<int32_t> nq = {1, 16, 3, 8, 16, 5, 2, 0, 1};
  PagedCase pc(dm, lens, nq, 1000 + c.bk * 7 + int(c.dtype));
  pc.write_by_hand(pc.lens);
  Outputs ref = run_prefill(pc);
  Outputs got = run_decode(pc);
  expect_same(got, ref, dm.dtype);
  // Sanity of the comparison itself: long requests must select fewer than all of their blocks.
  int64_t partial = 0;
  for (int64_t i = 0; i < pc.cu_q.back(); ++i)
    partial += got.topk_idx[i * dm.h_kv * dm.topk + dm.topk - 1] >= 0 ? 1 : 0;
  EXPECT_GT(partial, 0);
}

INSTANTIATE_TEST_SUITE_P(Shapes, DecodeVsPrefill,
                         ::testing::Values(DecodeCase{DType::f32, 16, 4}, DecodeCase{DType::bf16, 16, 16},
                                           DecodeCase{DType::f32, 64, 4}, DecodeCase{DType::bf16, 64, 4},
                                           DecodeCase{DType::f32, 128, 4}, DecodeCase{DType::bf16, 128, 2},
                                           DecodeCase{DType::f64, 64, 3}),
                         [](const auto& info) {
                           return std::string(dtype_name(info.param.dtype)) + "_bk" + std::to_string(info.param.bk) +
                                  "_topk" + std::to_string(info.param.topk);
                         });

TEST(Decode, SingleRequestWithoutCuSeqlens) {
  Dims dm;
  dm.h_q = 8;
  dm.h_kv = 1;
  dm.d = 128;
  dm.d_idx = 64;
  dm.bk = 128;
  PagedCase pc(dm, {1000}, {4}, 7);
  pc.write_by_hand(pc.lens);
  Outputs ref = run_prefill(pc);
  const int64_t n_q = 4;
  Buf q(dm.dtype, pc.q), qidx(dm.dtype, pc.qidx);
  Outputs got;
  got.topk_idx.assign(n_q * dm.topk, -7);
  got.index_lse.assign(n_q, 0.f);
  got.lse.assign(n_q * dm.h_q, 0.f);
  got.o = Buf(dm.dtype, size_t(n_q * dm.h_q * dm.d));
  DecodeIndexParams ip = index_params(pc, pc.lens.data(), qidx, got);
  ip.cu_seqlens_q = nullptr;
  decode_index_topk(ip);
  DecodeAttentionParams ap = attention_params(pc, pc.lens.data(), q, got);
  ap.cu_seqlens_q = nullptr;
  decode_attention(ap);
  expect_same(got, ref, dm.dtype);
}

// Independent of the prefill code: o and lse of one token over its selected blocks, in double.
TEST(Decode, AttentionMatchesDirectSum) {
  Dims dm;
  dm.bk = 16;
  dm.topk = 3;
  dm.h_q = 2;
  dm.h_kv = 1;
  dm.d = 16;
  PagedCase pc(dm, {16 * 9 + 5}, {2}, 11);
  pc.write_by_hand(pc.lens);
  Outputs got = run_decode(pc);
  const int64_t len = pc.lens[0], row = dm.h_kv * dm.d;
  double worst = 0;
  for (int64_t t = 0; t < 2; ++t) {
    const int64_t pos = len - 2 + t;
    for (int64_t h = 0; h < dm.h_q; ++h) {
      std::vector<int64_t> keys;
      for (int64_t s = 0; s < dm.topk; ++s) {
        int32_t blk = got.topk_idx[t * dm.topk + s];
        ASSERT_GE(blk, 0);
        for (int64_t j = blk * dm.bk; j < std::min<int64_t>((blk + 1) * dm.bk, pos + 1); ++j) keys.push_back(j);
      }
      std::vector<double> sc;
      double mx = -1e300;
      for (int64_t j : keys) {
        double s = 0;
        for (int64_t e = 0; e < dm.d; ++e) s += pc.q[(t * dm.h_q + h) * dm.d + e] * pc.k[j * row + e];
        sc.push_back(s / std::sqrt(double(dm.d)));
        mx = std::max(mx, sc.back());
      }
      double sum = 0;
      for (double& s : sc) sum += (s = std::exp(s - mx));
      worst = std::max(worst, std::abs(got.lse[t * dm.h_q + h] - (mx + std::log(sum))));
      for (int64_t e = 0; e < dm.d; ++e) {
        double o = 0;
        for (size_t u = 0; u < keys.size(); ++u) o += sc[u] * pc.v[keys[u] * row + e];
        worst = std::max(worst, std::abs(got.o.get((t * dm.h_q + h) * dm.d + e) - o / sum));
      }
    }
  }
  EXPECT_LT(worst, 1e-5) << "worst |decode - direct sum| over o and lse";
}

// Generation: the cache holds a prompt written by hand; tokens then arrive through append_kv in
// steps of 1..16 per request (crossing page boundaries), and the pool must equal a cache written
// entirely by hand, byte for byte, NaN of the untouched slots included.
TEST(Decode, AppendEqualsHandWrittenCache) {
  for (DType dt : {DType::f32, DType::bf16}) {
    Dims dm;
    dm.dtype = dt;
    dm.bk = 16;
    std::vector<int32_t> lens = {40, 17, 16, 90, 5};
    PagedCase pc(dm, lens, {1, 1, 1, 1, 1}, 21 + int(dt));
    std::vector<int32_t> prompt = {1, 0, 16, 33, 2};  // tokens already in the cache
    pc.write_by_hand(prompt);
    std::vector<int32_t> cur = prompt;
    std::mt19937_64 rng(5);
    const int64_t row = dm.h_kv * dm.d;
    while (cur != lens) {
      std::vector<int32_t> n_new(pc.batch());
      for (int64_t b = 0; b < pc.batch(); ++b) n_new[b] = std::min<int32_t>(lens[b] - cur[b], int32_t(rng() % 17));
      std::vector<int32_t> cu = cu_from_lengths(n_new);
      const int64_t n = cu.back();
      // New k, v with a padded token stride, k_idx contiguous.
      const int64_t sk = row + 5;
      Buf k(dt, size_t(std::max<int64_t>(n, 1) * sk)), v(dt, k.size()),
          x(dt, size_t(std::max<int64_t>(n, 1) * dm.d_idx));
      for (int64_t b = 0; b < pc.batch(); ++b)
        for (int64_t t = 0; t < n_new[b]; ++t) {
          const int64_t src = pc.cu_k[b] + cur[b] + t, dst = cu[b] + t;
          for (int64_t e = 0; e < row; ++e) {
            k.set(dst * sk + e, pc.k[src * row + e]);
            v.set(dst * sk + e, pc.v[src * row + e]);
          }
          for (int64_t e = 0; e < dm.d_idx; ++e) x.set(dst * dm.d_idx + e, pc.kidx[src * dm.d_idx + e]);
        }
      for (int64_t b = 0; b < pc.batch(); ++b) cur[b] += n_new[b];
      AppendKvParams p;
      p.cache = pc.cache(cur.data());
      p.dtype = dt;
      p.n_new = n;
      p.cu_new = cu.data();
      p.k = k.data();
      p.stride_k_tok = sk;
      p.v = v.data();
      p.stride_v_tok = sk;
      p.k_idx = x.data();
      append_kv(p);
    }
    PagedCase hand(dm, lens, {1, 1, 1, 1, 1}, 21 + int(dt));
    hand.write_by_hand(lens);
    ASSERT_EQ(pc.table, hand.table);
    EXPECT_TRUE(pc.kc.bytes == hand.kc.bytes) << dtype_name(dt);
    EXPECT_TRUE(pc.vc.bytes == hand.vc.bytes) << dtype_name(dt);
    EXPECT_TRUE(pc.xc.bytes == hand.xc.bytes) << dtype_name(dt);
    // And decode on the appended cache equals the prefill.
    expect_same(run_decode(pc), run_prefill(pc), dt);
  }
}

TEST(Decode, AppendWithoutIndexBranchLeavesNoIndexCache) {
  Dims dm;
  dm.bk = 16;
  PagedCase pc(dm, {20}, {1}, 3);
  std::vector<int32_t> len = {20};
  const int64_t row = dm.h_kv * dm.d;
  Buf k(dm.dtype, std::vector<double>(pc.k.begin(), pc.k.begin() + 20 * row));
  Buf v(dm.dtype, std::vector<double>(pc.v.begin(), pc.v.begin() + 20 * row));
  AppendKvParams p;
  p.cache = pc.cache(len.data());
  p.cache.k_idx_cache = nullptr;
  p.dtype = dm.dtype;
  p.n_new = 20;
  p.k = k.data();
  p.v = v.data();
  append_kv(p);
  PagedCase hand(dm, {20}, {1}, 3);
  hand.write_by_hand(len);
  EXPECT_TRUE(pc.kc.bytes == hand.kc.bytes);
  EXPECT_TRUE(pc.vc.bytes == hand.vc.bytes);
}

TEST(Decode, NoQueriesIsANoOp) {
  Dims dm;
  PagedCase pc(dm, {10, 3}, {0, 0}, 4);
  Buf q(dm.dtype, 1), qidx(dm.dtype, 1);
  Outputs out;
  DecodeIndexParams ip = index_params(pc, pc.lens.data(), qidx, out);
  ip.q_idx = nullptr;
  EXPECT_NO_THROW(decode_index_topk(ip));
  DecodeAttentionParams ap = attention_params(pc, pc.lens.data(), q, out);
  ap.q = nullptr;
  EXPECT_NO_THROW(decode_attention(ap));
}

// Dense decode (topk_idx = nullptr): every visible block, equal to the dense prefill
// (dense_attention_forward) on the last tokens of the same sequences; the NaN in unused pages and
// page tails must not leak in, and the topk field is ignored.
TEST(Decode, DenseEqualsDensePrefill) {
  for (DType dt : {DType::f32, DType::bf16}) {
    for (int64_t bk : {16, 64}) {
      Dims dm;
      dm.dtype = dt;
      dm.bk = bk;
      const int32_t b = int32_t(bk);
      std::vector<int32_t> lens = {1, b - 1, b + 1, 5 * b + 3, 50, 1023};
      std::vector<int32_t> nq = {1, 16, 3, 17, 0, 2};
      PagedCase pc(dm, lens, nq, 300 + bk + int(dt));
      pc.write_by_hand(pc.lens);
      const int64_t n_q = pc.cu_q.back();
      Buf q(dt, pc.q), k(dt, pc.k), v(dt, pc.v);
      Buf o_ref(dt, size_t(n_q * dm.h_q * dm.d)), o(dt, o_ref.size());
      o.poison();
      std::vector<float> lse_ref(n_q * dm.h_q), lse(n_q * dm.h_q, 0.f);
      AttentionParams ap;
      ap.seq.n_q = n_q;
      ap.seq.n_k = pc.cu_k.back();
      ap.seq.batch = pc.batch();
      ap.seq.cu_seqlens_q = pc.cu_q.data();
      ap.seq.cu_seqlens_k = pc.cu_k.data();
      ap.h_q = dm.h_q;
      ap.h_kv = dm.h_kv;
      ap.d = dm.d;
      ap.dtype = dt;
      ap.q = q.data();
      ap.k = k.data();
      ap.v = v.data();
      ap.o = o_ref.data();
      ap.lse = lse_ref.data();
      dense_attention_forward(ap);
      Outputs out;
      out.o = o;
      out.lse = lse;
      DecodeAttentionParams p = attention_params(pc, pc.lens.data(), q, out);
      p.topk_idx = nullptr;
      p.topk = 0;
      p.o = o.data();
      p.lse = lse.data();
      decode_attention(p);
      const double tol_o = dt == DType::bf16 ? 4e-3 : 1e-6;
      EXPECT_TRUE(allclose(as_double(lse), as_double(lse_ref), 1e-6, 1e-6, "dense lse"));
      EXPECT_TRUE(allclose(o.to_double(), o_ref.to_double(), tol_o, tol_o, "dense o"));
      // The planned form with a dense CPU plan (topk = 0) gives the same.
      DecodeShape s;
      s.batch = pc.batch();
      s.n_q = n_q;
      s.max_q = 17;
      s.max_blocks = pc.max_blocks;
      s.bk = bk;
      s.h_kv = dm.h_kv;
      s.h_q = dm.h_q;
      s.d = dm.d;
      s.d_idx = 0;
      s.topk = 0;
      s.dtype = dt;
      const DecodePlan plan = plan_decode(s, Exec{});
      Buf o2(dt, o.size());
      std::vector<float> lse2(lse.size());
      p.o = o2.data();
      p.lse = lse2.data();
      p.topk = 5;  // ignored in dense mode
      decode_attention(p, plan, nullptr, Exec{});
      EXPECT_TRUE(o2.bytes == o.bytes);
      EXPECT_EQ(lse2, lse);
    }
  }
}

// ---- the FP8 index-key cache (IndexKeyFormat::fp8_e4m3) ----

// The e4m3 codec against values written out by hand and against its own rounding rule.
TEST(Fp8Codec, EncodeDecodeAndRounding) {
  using detail::e4m3_decode;
  using detail::e4m3_encode;
  EXPECT_EQ(e4m3_decode(0x38), 1.f);
  EXPECT_EQ(e4m3_decode(0x01), std::ldexp(1.f, -9));    // smallest subnormal
  EXPECT_EQ(e4m3_decode(0x08), std::ldexp(1.f, -6));    // smallest normal
  EXPECT_EQ(e4m3_decode(0x7E), 448.f);                  // largest finite
  EXPECT_EQ(e4m3_decode(0xC4), -3.f);                   // -1.5 * 2^1
  EXPECT_TRUE(std::isnan(e4m3_decode(0x7F)));
  EXPECT_EQ(e4m3_encode(448.f), 0x7E);
  EXPECT_EQ(e4m3_encode(1e30f), 0x7E);  // saturates, never NaN
  EXPECT_EQ(e4m3_encode(-500.f), 0xFE);
  EXPECT_EQ(e4m3_encode(-0.f), 0x80);
  int checked = 0;
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7F) == 0x7F) continue;
    ASSERT_EQ(e4m3_encode(e4m3_decode(uint8_t(b))), b) << "byte " << b;
    // Between b and the next magnitude up: the midpoint goes to the even mantissa, anything off it
    // to the nearer one.
    if ((b & 0x7F) >= 0x7E) continue;
    const float lo = e4m3_decode(uint8_t(b)), hi = e4m3_decode(uint8_t(b + 1)), mid = 0.5f * (lo + hi);
    const int even = (b & 1) == 0 ? b : b + 1;
    ASSERT_EQ(e4m3_encode(mid), even) << "midpoint above byte " << b;
    ASSERT_EQ(e4m3_encode(std::nextafter(mid, lo)), b);
    ASSERT_EQ(e4m3_encode(std::nextafter(mid, hi)), b + 1);
    ++checked;
  }
  EXPECT_EQ(checked, 2 * 126);
}

TEST(Fp8Codec, QuantizeRowContract) {
  std::vector<uint8_t> q(5);
  std::vector<float> x = {1.f, -7.f, 0.25f, 3.5f, 0.f};
  float s = detail::e4m3_quantize_row(x.data(), 5, q.data());
  EXPECT_EQ(s, 7.f / 448.f);
  EXPECT_EQ(q[1], 0xFE);  // the row's max maps to -448 exactly
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(detail::e4m3_decode(q[i]) * s, x[i], std::ldexp(std::fabs(x[i]), -4) + 1e-7);
  std::vector<float> zeros(5, 0.f), tiny(5, 1e-35f), nan = x, inf = x;
  nan[2] = NAN;
  inf[0] = -INFINITY;
  EXPECT_EQ(detail::e4m3_quantize_row(zeros.data(), 5, q.data()), 0.f);
  EXPECT_EQ(detail::e4m3_quantize_row(tiny.data(), 5, q.data()), 0.f);  // below 2^-100: a zero row
  EXPECT_EQ(q, std::vector<uint8_t>(5, 0));
  EXPECT_TRUE(std::isnan(detail::e4m3_quantize_row(nan.data(), 5, q.data())));
  EXPECT_EQ(q, std::vector<uint8_t>(5, 0));
  EXPECT_TRUE(std::isnan(detail::e4m3_quantize_row(inf.data(), 5, q.data())));
}

// An fp8 index cache beside a PagedCase's K/V cache: bytes [n_pages, bk, d_idx] and scales.
struct Fp8Index {
  std::vector<uint8_t> bytes;
  std::vector<float> scale;
  explicit Fp8Index(const PagedCase& pc)
      : bytes(size_t(pc.n_pages * pc.dm.bk * pc.dm.d_idx), 0x7F), scale(size_t(pc.n_pages * pc.dm.bk), NAN) {}
  void attach(PagedKvCache& c) {
    c.k_idx_cache = bytes.data();
    c.k_idx_format = IndexKeyFormat::fp8_e4m3;
    c.k_idx_scale = scale.data();
  }
};

// Appends every token of pc (all requests, in two steps) into its K/V cache and an fp8 index cache.
void append_all_fp8(PagedCase& pc, Fp8Index& fx) {
  const Dims& dm = pc.dm;
  const int64_t row = dm.h_kv * dm.d;
  std::vector<int32_t> half(pc.batch()), cur(pc.batch(), 0);
  for (int64_t b = 0; b < pc.batch(); ++b) half[b] = pc.nq[b] > 0 ? pc.lens[b] / 2 : 0;
  for (const std::vector<int32_t>* upto : {&half, &pc.lens}) {
    std::vector<int32_t> n_new(pc.batch()), lens(pc.batch());
    for (int64_t b = 0; b < pc.batch(); ++b) {
      lens[b] = pc.nq[b] > 0 ? (*upto)[b] : 0;
      n_new[b] = lens[b] - cur[b];
    }
    std::vector<int32_t> cu = cu_from_lengths(n_new);
    const int64_t n = cu.back();
    Buf k(dm.dtype, size_t(std::max<int64_t>(n, 1) * row)), v(dm.dtype, k.size()),
        x(dm.dtype, size_t(std::max<int64_t>(n, 1) * dm.d_idx));
    for (int64_t b = 0; b < pc.batch(); ++b)
      for (int64_t t = 0; t < n_new[b]; ++t) {
        const int64_t src = pc.cu_k[b] + cur[b] + t, dst = cu[b] + t;
        for (int64_t e = 0; e < row; ++e) k.set(dst * row + e, pc.k[src * row + e]), v.set(dst * row + e, pc.v[src * row + e]);
        for (int64_t e = 0; e < dm.d_idx; ++e) x.set(dst * dm.d_idx + e, pc.kidx[src * dm.d_idx + e]);
      }
    AppendKvParams p;
    p.cache = pc.cache(lens.data());
    fx.attach(p.cache);
    p.dtype = dm.dtype;
    p.n_new = n;
    p.cu_new = cu.data();
    p.k = k.data();
    p.v = v.data();
    p.k_idx = x.data();
    append_kv(p);
    cur = lens;
  }
}

// append_kv into an fp8 index cache: each token's bytes and scale follow the quantization
// contract, the error per element is within half an e4m3 step, the K/V cache is written as usual.
TEST(DecodeFp8, AppendQuantizesEachToken) {
  for (DType dt : {DType::f32, DType::bf16}) {
    Dims dm;
    dm.dtype = dt;
    dm.bk = 16;
    dm.d_idx = 64;
    PagedCase pc(dm, {40, 17, 3, 90}, {1, 2, 1, 1}, 31 + int(dt));
    // Rows that exercise the edges: all zero, one NaN, one huge element, tiny values.
    auto tok = [&](int64_t b, int64_t t) { return &pc.kidx[(pc.cu_k[b] + t) * dm.d_idx]; };
    std::fill(tok(0, 3), tok(0, 3) + dm.d_idx, 0.0);
    tok(1, 5)[7] = NAN;
    tok(3, 60)[0] = 3e4;
    for (int64_t e = 0; e < dm.d_idx; ++e) tok(3, 61)[e] = 1e-20 * double(e % 5 - 2);
    Fp8Index fx(pc);
    append_all_fp8(pc, fx);
    PagedCase hand(dm, pc.lens, pc.nq, 31 + int(dt));
    hand.write_by_hand(hand.lens);
    EXPECT_TRUE(pc.kc.bytes == hand.kc.bytes) << dtype_name(dt);
    EXPECT_TRUE(pc.vc.bytes == hand.vc.bytes) << dtype_name(dt);
    int64_t checked = 0;
    for (int64_t b = 0; b < pc.batch(); ++b)
      for (int64_t t = 0; t < pc.lens[b]; ++t) {
        const int64_t slot = pc.table[b * pc.max_blocks + t / dm.bk] * dm.bk + t % dm.bk;
        std::vector<float> x(dm.d_idx);
        for (int64_t e = 0; e < dm.d_idx; ++e) x[e] = float(Buf(dt, std::vector<double>{tok(b, t)[e]}).get(0));
        std::vector<uint8_t> want(dm.d_idx);
        const float ws = detail::e4m3_quantize_row(x.data(), dm.d_idx, want.data());
        const float got_s = fx.scale[slot];
        ASSERT_TRUE(got_s == ws || (std::isnan(got_s) && std::isnan(ws))) << "request " << b << " token " << t;
        ASSERT_TRUE(std::equal(want.begin(), want.end(), fx.bytes.begin() + slot * dm.d_idx));
        if (!std::isfinite(got_s)) continue;
        for (int64_t e = 0; e < dm.d_idx; ++e) {
          const double dq = double(detail::e4m3_decode(fx.bytes[slot * dm.d_idx + e])) * got_s;
          ASSERT_LE(std::fabs(dq - x[e]), std::ldexp(std::fabs(x[e]), -4) + std::ldexp(double(got_s), -10) + 1e-300)
              << "request " << b << " token " << t << " element " << e;
        }
        ++checked;
      }
    EXPECT_EQ(checked, 40 + 17 + 3 + 90 - 1);  // all but the NaN row
    EXPECT_TRUE(std::isnan(fx.scale[pc.table[1 * pc.max_blocks + 0] * dm.bk + 5]));
    EXPECT_EQ(fx.scale[pc.table[0] * dm.bk + 3], 0.f);
  }
}

// When every key and query row is exactly representable (e4m3 values times a power of two, with
// +-448 in the row), quantization is exact and the fp8 index pass must select exactly what the
// native pass selects on the same values, with the same index_lse.
TEST(DecodeFp8, ExactValuesSelectLikeTheNativeCache) {
  for (int64_t bk : {16, 64}) {
    Dims dm;
    dm.dtype = DType::f32;
    dm.bk = bk;
    dm.topk = 4;
    dm.d_idx = 32;
    const int32_t kb = int32_t(dm.topk * bk);
    PagedCase pc(dm, {1, int32_t(bk) + 1, kb - 1, 3 * kb + 5, 2 * kb}, {1, 3, 2, 5, 1}, 77 + bk);
    std::mt19937_64 rng(91 + bk);
    auto fill = [&](double* row, int64_t n) {
      const int sh = int(rng() % 9) - 4;  // the row's power-of-two scale
      for (int64_t e = 0; e < n; ++e) {
        uint8_t byte = uint8_t(rng() % 256);
        if ((byte & 0x7F) == 0x7F) byte = 0x30;
        row[e] = std::ldexp(double(detail::e4m3_decode(byte)), sh);
      }
      row[rng() % n] = std::ldexp(rng() % 2 ? 448.0 : -448.0, sh);
    };
    for (int64_t t = 0; t < pc.cu_k.back(); ++t) fill(&pc.kidx[t * dm.d_idx], dm.d_idx);
    for (int64_t r = 0; r < pc.cu_q.back() * dm.h_kv; ++r) fill(&pc.qidx[r * dm.d_idx], dm.d_idx);
    pc.write_by_hand(pc.lens);
    Outputs native = run_decode(pc);
    Fp8Index fx(pc);
    append_all_fp8(pc, fx);
    Outputs f8;
    const int64_t n_q = pc.cu_q.back();
    f8.topk_idx.assign(n_q * dm.h_kv * dm.topk, -7);
    f8.index_lse.assign(n_q * dm.h_kv, 0.f);
    Buf qidx(dm.dtype, pc.qidx);
    DecodeIndexParams ip = index_params(pc, pc.lens.data(), qidx, f8);
    fx.attach(ip.cache);
    decode_index_topk(ip);
    EXPECT_EQ(f8.topk_idx, native.topk_idx) << "bk " << bk;
    EXPECT_TRUE(allclose(as_double(f8.index_lse), as_double(native.index_lse), 1e-6, 1e-6, "index_lse"));
    int64_t partial = 0;
    for (int64_t i = 0; i < n_q; ++i) partial += f8.topk_idx[i * dm.h_kv * dm.topk + dm.topk - 1] >= 0;
    EXPECT_GT(partial, 0);
  }
}

// ---- validation ----

struct Bad {
  PagedCase pc;
  Buf q, qidx;
  Outputs out;
  Bad() : pc(make_dims(), {100, 40}, {2, 3}, 9), q(pc.dm.dtype, pc.q), qidx(pc.dm.dtype, pc.qidx) {
    pc.write_by_hand(pc.lens);
    out.topk_idx.assign(pc.cu_q.back() * pc.dm.h_kv * pc.dm.topk, -7);
    out.index_lse.assign(pc.cu_q.back() * pc.dm.h_kv, 0.f);
    out.lse.assign(pc.cu_q.back() * pc.dm.h_q, 0.f);
    out.o = Buf(pc.dm.dtype, size_t(pc.cu_q.back() * pc.dm.h_q * pc.dm.d));
  }
  static Dims make_dims() {
    Dims d;
    d.bk = 16;
    return d;
  }
  DecodeIndexParams ip() { return index_params(pc, pc.lens.data(), qidx, out); }
  DecodeAttentionParams ap() {
    DecodeIndexParams i = ip();
    decode_index_topk(i);
    return attention_params(pc, pc.lens.data(), q, out);
  }
};

TEST(DecodeValidation, BlockTableEntries) {
  Bad t;
  t.pc.table[1 * t.pc.max_blocks + 2] = -1;  // request 1 (40 tokens) needs blocks 0..2
  EXPECT_TRUE(throws_error([&] { decode_index_topk(t.ip()); },
                           {"msa::decode_index_topk", "cache.block_table[1, 2] = -1", "n_pages"}));
  t.pc.table[1 * t.pc.max_blocks + 2] = int32_t(t.pc.n_pages);
  auto ap = attention_params(t.pc, t.pc.lens.data(), t.q, t.out);
  EXPECT_TRUE(throws_error([&] { decode_attention(ap); }, {"msa::decode_attention", "cache.block_table[1, 2]"}));
  // Entries past the last needed block are never read.
  Bad u;
  u.pc.table[1 * u.pc.max_blocks + 3] = 123456;
  EXPECT_NO_THROW(decode_index_topk(u.ip()));
  // The outputs are untouched when validation throws.
  Bad w;
  w.pc.table[0] = -5;
  std::vector<int32_t> before = w.out.topk_idx;
  EXPECT_THROW(decode_index_topk(w.ip()), Error);
  EXPECT_EQ(w.out.topk_idx, before);
}

TEST(DecodeValidation, SeqLensAndQueryCounts) {
  Bad t;
  std::vector<int32_t> too_long = {int32_t(t.pc.max_blocks * 16 + 1), 40};
  auto ip = t.ip();
  ip.cache.seq_lens = too_long.data();
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cache.seq_lens[0]", "max_blocks * bk"}));
  std::vector<int32_t> negative = {100, -1};
  ip.cache.seq_lens = negative.data();
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cache.seq_lens[1] = -1"}));
  std::vector<int32_t> short_lens = {100, 2};  // request 1 has 3 queries
  ip.cache.seq_lens = short_lens.data();
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cu_seqlens_q", "request 1 has 3 query tokens"}));
  ip = t.ip();
  ip.cache.seq_lens = nullptr;
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cache.seq_lens is null"}));
  ip = t.ip();
  ip.cu_seqlens_q = nullptr;
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cu_seqlens_q is null", "batch = 2"}));
  ip = t.ip();
  ip.n_q = 4;
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cu_seqlens_q[2] = 5", "n_q = 4"}));
}

TEST(DecodeValidation, ShapesAndSelection) {
  Bad t;
  auto ip = t.ip();
  ip.topk = 0;
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"topk = 0"}));
  ip = t.ip();
  ip.cache.k_idx_cache = nullptr;
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cache.k_idx_cache is null"}));
  ip = t.ip();
  ip.cache.bk = 0;
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cache.bk = 0"}));
  auto ap = t.ap();
  ap.h_q = 3;
  EXPECT_TRUE(throws_error([&] { decode_attention(ap); }, {"msa::decode_attention", "h_q = 3"}));
  ap = t.ap();
  t.out.topk_idx[0] = 99;  // query 0 of request 0 sits at position 98: blocks 0..6
  EXPECT_TRUE(throws_error([&] { decode_attention(ap); }, {"topk_idx[0, 0, 0] = 99", "visible block"}));
  ap = t.ap();
  ap.cache.v_cache = nullptr;
  EXPECT_TRUE(throws_error([&] { decode_attention(ap); }, {"cache.v_cache is null"}));
  ap = t.ap();
  ap.dtype = DType(7);
  EXPECT_TRUE(throws_error([&] { decode_attention(ap); }, {"dtype = 7"}));
}

TEST(DecodeValidation, Append) {
  Bad t;
  const int64_t row = t.pc.dm.h_kv * t.pc.dm.d;
  Buf k(t.pc.dm.dtype, size_t(4 * row)), v(t.pc.dm.dtype, size_t(4 * row)), x(t.pc.dm.dtype, size_t(4 * t.pc.dm.d_idx));
  std::vector<int32_t> cu = {0, 3, 4};
  auto make = [&] {
    AppendKvParams p;
    p.cache = t.pc.cache(t.pc.lens.data());
    p.dtype = t.pc.dm.dtype;
    p.n_new = 4;
    p.cu_new = cu.data();
    p.k = k.data();
    p.v = v.data();
    p.k_idx = x.data();
    return p;
  };
  EXPECT_NO_THROW(append_kv(make()));
  std::vector<int32_t> lens = {2, 40};  // request 0 gets 3 new tokens
  auto p = make();
  p.cache.seq_lens = lens.data();
  EXPECT_TRUE(throws_error([&] { append_kv(p); }, {"msa::append_kv", "cu_new", "request 0 has 3 new tokens"}));
  p = make();
  p.n_new = 5;
  EXPECT_TRUE(throws_error([&] { append_kv(p); }, {"cu_new[2] = 4", "n_new = 5"}));
  p = make();
  p.k_idx = nullptr;
  EXPECT_TRUE(throws_error([&] { append_kv(p); }, {"k_idx is null", "both set"}));
  p = make();
  p.v = nullptr;
  EXPECT_TRUE(throws_error([&] { append_kv(p); }, {"v is null"}));
  // Both requests write the same page: a race.
  std::vector<int32_t> shared = t.pc.table;
  shared[1 * t.pc.max_blocks + 2] = shared[0 * t.pc.max_blocks + 6];
  p = make();
  p.cache.block_table = shared.data();
  EXPECT_TRUE(throws_error([&] { append_kv(p); }, {"cache.block_table[1, 2]", "no other block writes"}));
  // A written block without a page.
  std::vector<int32_t> hole = t.pc.table;
  hole[0 * t.pc.max_blocks + 6] = -1;
  p = make();
  p.cache.block_table = hole.data();
  EXPECT_TRUE(throws_error([&] { append_kv(p); }, {"cache.block_table[0, 6] = -1"}));
}

TEST(DecodeValidation, CudaBackendWithoutCudaBuild) {
  if (cuda_compiled()) GTEST_SKIP() << "this build has the CUDA backend; tests/test_cuda_decode_*.cpp cover it";
  Bad t;
  Exec ex;
  ex.backend = Backend::cuda;
  EXPECT_TRUE(throws_error([&] { decode_index_topk(t.ip(), ex); }, {"msa::decode_index_topk", "backend = cuda"}));
  auto ap = t.ap();
  EXPECT_TRUE(throws_error([&] { decode_attention(ap, ex); }, {"msa::decode_attention", "backend = cuda"}));
  AppendKvParams p;
  p.cache = t.pc.cache(t.pc.lens.data());
  EXPECT_TRUE(throws_error([&] { append_kv(p, ex); }, {"msa::append_kv", "backend = cuda"}));
  EXPECT_TRUE(throws_error([&] { plan_decode(DecodeShape{}, ex); }, {"msa::plan_decode", "backend = cuda"}));
}

// A CPU plan needs no workspace; a plan of the other backend is refused by name.
TEST(DecodeValidation, PlanBackendMustMatchTheCall) {
  DecodeShape s;
  s.batch = 2;
  s.n_q = 2;
  s.max_blocks = 4;
  s.h_kv = 2;
  s.h_q = 4;
  s.d = 16;
  s.d_idx = 16;
  s.topk = 2;
  s.dtype = DType::f32;
  DecodePlan plan = plan_decode(s, Exec{});
  EXPECT_EQ(plan.workspace_bytes, 0u);
  EXPECT_EQ(plan.backend, Backend::cpu);
  Bad t;
  DecodePlan other = plan;
  other.backend = Backend::cuda;
  EXPECT_TRUE(throws_error([&] { decode_index_topk(t.ip(), other, nullptr, Exec{}); },
                           {"msa::decode_index_topk", "plan.backend = cuda", "expected the call's backend cpu"}));
  s.h_q = 3;
  EXPECT_TRUE(throws_error([&] { plan_decode(s, Exec{}); }, {"msa::plan_decode", "h_q"}));
  s = DecodeShape{};
  s.h_kv = 1;
  EXPECT_TRUE(throws_error([&] { plan_decode(s, Exec{}); }, {"msa::plan_decode", "plans nothing"}));
}

TEST(DecodeFp8, Validation) {
  Bad t;
  Fp8Index fx(t.pc);
  auto ip = t.ip();
  fx.attach(ip.cache);
  EXPECT_NO_THROW(decode_index_topk(ip));
  ip.cache.k_idx_scale = nullptr;
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"msa::decode_index_topk", "cache.k_idx_scale is null"}));
  ip = t.ip();
  ip.cache.k_idx_scale = fx.scale.data();  // a scale pool with a native cache
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cache.k_idx_scale is set", "native"}));
  ip = t.ip();
  ip.cache.k_idx_format = IndexKeyFormat(3);
  EXPECT_TRUE(throws_error([&] { decode_index_topk(ip); }, {"cache.k_idx_format = 3", "fp8_e4m3"}));
  DecodeShape sh;
  sh.h_kv = 2;
  sh.d_idx = 32;
  sh.max_blocks = 4;
  sh.k_idx_format = IndexKeyFormat(9);
  EXPECT_TRUE(throws_error([&] { plan_decode(sh); }, {"msa::plan_decode", "shape.k_idx_format = 9"}));
}

}  // namespace
}  // namespace msa::test
