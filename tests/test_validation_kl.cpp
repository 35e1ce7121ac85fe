// Argument validation of index_kl_loss and index_kl_backward: every rule the two calls reach
// throws msa::Error naming the function, the argument and what was expected, and writes nothing;
// plus the empty cases (N = 0) that are valid.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "msa/msa.h"
#include "test_util.h"

namespace msa::test {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// A valid call: one sequence of 20 tokens, h_q = 4, h_kv = 2, d = d_idx = 8, bk = 8, topk = 2,
// selection = the local block plus block 0.
struct Valid {
  static constexpr int64_t n = 20, h_q = 4, h_kv = 2, d = 8, d_idx = 8, bk = 8, topk = 2;
  Buf q, k, q_idx, k_idx, dq_idx, dk_idx;
  std::vector<int32_t> topk_idx;
  IndexKLParams p;

  Valid() {
    std::mt19937_64 rng(11);
    q = Buf(DType::f32, randn(rng, n * h_q * d));
    k = Buf(DType::f32, randn(rng, n * h_kv * d));
    q_idx = Buf(DType::f32, randn(rng, n * h_kv * d_idx));
    k_idx = Buf(DType::f32, randn(rng, n * d_idx));
    dq_idx = Buf(DType::f32, n * h_kv * d_idx);
    dk_idx = Buf(DType::f32, n * d_idx);
    dq_idx.poison();
    dk_idx.poison();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < h_kv; ++r) {
        const int32_t own = int32_t(i / bk);
        topk_idx.push_back(own);
        topk_idx.push_back(own > 0 ? 0 : -1);
      }
    p.seq.n_q = p.seq.n_k = n;
    p.h_q = h_q, p.h_kv = h_kv, p.d = d, p.d_idx = d_idx;
    p.dtype = DType::f32;
    p.lambda = 0.5f;
    p.q = q.data(), p.k = k.data(), p.q_idx = q_idx.data(), p.k_idx = k_idx.data();
    p.topk_idx = topk_idx.data(), p.topk = topk, p.bk = bk;
    p.dq_idx = dq_idx.data(), p.dk_idx = dk_idx.data();
  }

  bool outputs_untouched() const {
    for (double x : dq_idx.to_double())
      if (!std::isnan(x)) return false;
    for (double x : dk_idx.to_double())
      if (!std::isnan(x)) return false;
    return true;
  }
};

// Both calls reject p with every fragment in their message (prefixed by the function's name),
// and write nothing.
void expect_both_reject(const IndexKLParams& p, std::initializer_list<const char*> fragments, const Valid& v,
                        const Exec& ex = {}) {
  std::vector<const char*> fl(fragments);
  fl.push_back("msa::index_kl_loss: ");
  std::vector<const char*> fb(fragments);
  fb.push_back("msa::index_kl_backward: ");
  auto with = [](std::vector<const char*>& f, auto&& call) {
    // throws_error takes an initializer_list; check each fragment separately.
    for (const char* s : f) EXPECT_TRUE(throws_error(call, {s}));
  };
  with(fl, [&] { index_kl_loss(p, ex); });
  with(fb, [&] { index_kl_backward(p, ex); });
  EXPECT_TRUE(v.outputs_untouched()) << "an output was written by a call that threw";
}

TEST(KLValidation, ValidCallsPass) {
  Valid v;
  double loss = 0;
  ASSERT_NO_THROW(loss = index_kl_loss(v.p));
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_GT(loss, 0.0);
  ASSERT_NO_THROW(index_kl_backward(v.p));
  for (double x : v.dq_idx.to_double()) ASSERT_TRUE(std::isfinite(x));
  for (double x : v.dk_idx.to_double()) ASSERT_TRUE(std::isfinite(x));
}

TEST(KLValidation, Backend) {
  Valid v;
  Exec cuda;
  cuda.backend = Backend::cuda;
  if (cuda_compiled())  // the CUDA kernels take bfloat16; this valid CPU call is float32
    expect_both_reject(v.p, {"dtype = float32", "expected bfloat16 on the cuda backend"}, v, cuda);
  else
    expect_both_reject(v.p, {"backend = cuda", "no CUDA backend"}, v, cuda);
  Exec bad;
  bad.backend = Backend(7);
  expect_both_reject(v.p, {"backend = 7", "expected cpu or cuda"}, v, bad);
  Exec threads;
  threads.num_threads = -1;
  expect_both_reject(v.p, {"num_threads = -1", "expected >= 0"}, v, threads);
}

TEST(KLValidation, Dtype) {
  Valid v;
  IndexKLParams p = v.p;
  p.dtype = DType(9);
  expect_both_reject(p, {"dtype = 9"}, v);
}

TEST(KLValidation, Heads) {
  Valid v;
  IndexKLParams p = v.p;
  p.h_kv = 0;
  expect_both_reject(p, {"h_kv = 0"}, v);
  p = v.p;
  p.h_q = 0;
  expect_both_reject(p, {"h_q = 0"}, v);
  p = v.p;
  p.h_q = 5;
  expect_both_reject(p, {"h_q = 5, expected a multiple of h_kv = 2"}, v);
}

TEST(KLValidation, HeadDims) {
  Valid v;
  for (int64_t bad : {0, -8, 513}) {
    IndexKLParams p = v.p;
    p.d = bad;
    expect_both_reject(p, {(": d = " + std::to_string(bad)).c_str(), "expected 1 <= d <= 512"}, v);
    p = v.p;
    p.d_idx = bad;
    expect_both_reject(p, {("d_idx = " + std::to_string(bad)).c_str(), "expected 1 <= d_idx <= 512"}, v);
  }
}

TEST(KLValidation, Scales) {
  Valid v;
  for (float bad : {-1.f, kNaN, kInf, -kInf}) {
    IndexKLParams p = v.p;
    p.scale = bad;
    expect_both_reject(p, {": scale = ", "expected a finite positive number"}, v);
    p = v.p;
    p.index_scale = bad;
    expect_both_reject(p, {"index_scale = ", "expected a finite positive number"}, v);
  }
}

TEST(KLValidation, Lambda) {
  Valid v;
  for (float bad : {kNaN, kInf, -kInf}) {
    IndexKLParams p = v.p;
    p.lambda = bad;
    EXPECT_TRUE(throws_error([&] { index_kl_backward(p); }, {"msa::index_kl_backward: lambda = ", "finite"}));
    EXPECT_TRUE(v.outputs_untouched());
    // The loss does not use lambda.
    EXPECT_TRUE(std::isfinite(index_kl_loss(p)));
  }
}

TEST(KLValidation, NullPointers) {
  Valid v;
  struct Case {
    const char* name;
    const void* IndexKLParams::*field;
  };
  for (Case c : {Case{": q is null", &IndexKLParams::q}, Case{": k is null", &IndexKLParams::k},
                 Case{": q_idx is null", &IndexKLParams::q_idx}, Case{": k_idx is null", &IndexKLParams::k_idx}}) {
    IndexKLParams p = v.p;
    p.*c.field = nullptr;
    expect_both_reject(p, {c.name}, v);
  }
  for (auto [name, field] :
       {std::pair{": dq_idx is null", &IndexKLParams::dq_idx}, std::pair{": dk_idx is null", &IndexKLParams::dk_idx}}) {
    IndexKLParams p = v.p;
    p.*field = nullptr;
    EXPECT_TRUE(throws_error([&] { index_kl_backward(p); }, {"msa::index_kl_backward", name}));
    EXPECT_TRUE(v.outputs_untouched());
    EXPECT_NO_THROW(index_kl_loss(p));  // the loss writes no gradient
  }
}

TEST(KLValidation, Strides) {
  Valid v;
  IndexKLParams p = v.p;
  p.stride_q_tok = -32;
  expect_both_reject(p, {"q strides = (-32, 8)", "expected positive strides"}, v);
  p = v.p;
  p.stride_k_head = -8;
  expect_both_reject(p, {"k strides = (", "expected positive strides"}, v);
  p = v.p;
  p.stride_q_idx_head = -1;
  expect_both_reject(p, {"q_idx strides = (", "expected positive strides"}, v);
  p = v.p;
  p.stride_k_idx_tok = -8;
  expect_both_reject(p, {"k_idx strides = (-8, 1)", "expected positive strides"}, v);

  // Outputs that overlap themselves: heads closer than d_idx, tokens closer than d_idx, and heads
  // interleaved with tokens.
  p = v.p;
  p.stride_dq_idx_head = 4;
  EXPECT_TRUE(throws_error([&] { index_kl_backward(p); }, {"dq_idx strides = (8, 4)", "overlap"}));
  p = v.p;
  p.stride_dk_idx_tok = 7;
  EXPECT_TRUE(throws_error([&] { index_kl_backward(p); }, {"dk_idx strides = (7, 1)", "overlap"}));
  p = v.p;
  p.stride_dq_idx_tok = 8, p.stride_dq_idx_head = 16;
  EXPECT_TRUE(throws_error([&] { index_kl_backward(p); }, {"dq_idx strides = (8, 16)", "overlap"}));
  p = v.p;
  p.stride_dk_idx_tok = -8;
  EXPECT_TRUE(throws_error([&] { index_kl_backward(p); }, {"dk_idx strides = (-8, 1)", "positive"}));
  EXPECT_TRUE(v.outputs_untouched());

  // Inputs may overlap (a read-only broadcast): the same k_idx row for every token.
  p = v.p;
  p.stride_k_idx_tok = 1;
  EXPECT_NO_THROW(index_kl_loss(p));
}

TEST(KLValidation, TopkRange) {
  Valid v;
  for (int64_t bad : {0, -1, 33}) {
    IndexKLParams p = v.p;
    p.topk = bad;
    expect_both_reject(p, {("topk = " + std::to_string(bad)).c_str(), "expected 1 <= topk <= 32"}, v);
  }
  for (int64_t bad : {0, -8, 4097}) {
    IndexKLParams p = v.p;
    p.bk = bad;
    expect_both_reject(p, {("bk = " + std::to_string(bad)).c_str(), "expected 1 <= bk <= 4096"}, v);
  }
  // Without a selection (warm-up) topk and bk are not used.
  IndexKLParams p = v.p;
  p.topk_idx = nullptr, p.topk = 0, p.bk = 0;
  EXPECT_NO_THROW(index_kl_loss(p));
  EXPECT_NO_THROW(index_kl_backward(p));
}

TEST(KLValidation, TopkEntries) {
  auto with_entry = [&](int64_t i, int64_t r, int64_t t, int32_t b, std::initializer_list<const char*> frag) {
    Valid w;
    w.topk_idx[(i * Valid::h_kv + r) * Valid::topk + t] = b;
    expect_both_reject(w.p, frag, w);
  };
  // Query 3 (position 3) sees only block 0; query 12 sees blocks 0 and 1.
  with_entry(3, 1, 0, 1, {"topk_idx[3, 1, 0] = 1", "expected -1 or a visible block 0 <= b <= 0"});
  with_entry(12, 0, 1, 2, {"topk_idx[12, 0, 1] = 2", "visible block 0 <= b <= 1"});
  with_entry(12, 0, 1, -2, {"topk_idx[12, 0, 1] = -2", "visible block"});
  with_entry(12, 1, 1, 1, {"topk_idx[12, 1, 1] = 1", "no duplicate blocks"});
  with_entry(12, 0, 0, -1, {"topk_idx[12, 0, 1] = 0", "padding must be a tail"});
}

TEST(KLValidation, Varlen) {
  Valid v;
  const std::vector<int32_t> cu = {0, 8, 20};
  auto reject = [&](auto&& edit, std::initializer_list<const char*> frag) {
    IndexKLParams p = v.p;
    edit(p);
    expect_both_reject(p, frag, v);
  };
  reject([](IndexKLParams& p) { p.seq.n_q = -1; }, {"seq.n_q = -1"});
  reject([](IndexKLParams& p) { p.seq.batch = 0; }, {"seq.batch = 0"});
  reject([](IndexKLParams& p) { p.seq.batch = 2; }, {"seq.cu_seqlens_q is null with batch = 2"});
  reject([](IndexKLParams& p) { p.seq.n_k = 30; }, {"seq.cu_seqlens_k is null with n_k = 30 != n_q = 20"});
  const std::vector<int32_t> bad0 = {1, 8, 20}, decreasing = {0, 12, 8, 20}, short_end = {0, 8, 19};
  reject([&](IndexKLParams& p) { p.seq.batch = 2, p.seq.cu_seqlens_q = bad0.data(); },
         {"seq.cu_seqlens_q[0] = 1, expected 0"});
  reject([&](IndexKLParams& p) { p.seq.batch = 3, p.seq.cu_seqlens_q = decreasing.data(); },
         {"seq.cu_seqlens_q[2] = 8 < seq.cu_seqlens_q[1] = 12", "non-decreasing"});
  reject(
      [&](IndexKLParams& p) { p.seq.batch = 2, p.seq.cu_seqlens_q = cu.data(), p.seq.cu_seqlens_k = short_end.data(); },
      {"seq.cu_seqlens_k[2] = 19, expected the token count 20"});
  // More queries than keys in a sequence without explicit positions.
  const std::vector<int32_t> cu_k = {0, 10, 20};
  reject([&](IndexKLParams& p) { p.seq.batch = 2, p.seq.cu_seqlens_q = cu.data(), p.seq.cu_seqlens_k = cu_k.data(); },
         {"sequence 1 has 12 queries but 10 keys"});
  std::vector<int32_t> q_pos(20);
  for (int32_t i = 0; i < 20; ++i) q_pos[i] = i;
  q_pos[5] = 20;
  reject([&](IndexKLParams& p) { p.seq.q_pos = q_pos.data(); }, {"seq.q_pos[5] = 20", "expected 0 <= q_pos < 20"});
}

TEST(KLValidation, EmptyInputs) {
  // N = 0: the loss is 0 with every pointer null.
  IndexKLParams p;
  p.h_q = 4, p.h_kv = 2, p.d = 8, p.d_idx = 8, p.dtype = DType::f32;
  EXPECT_EQ(index_kl_loss(p), 0.0);
  EXPECT_NO_THROW(index_kl_backward(p));

  // n_q = 0 with keys present (a rank of a context-parallel group without queries): the loss is 0
  // and the backward zeroes dk_idx, with or without a selection. The inputs may be null.
  const int64_t n_k = 13, d_idx = 8;
  const std::vector<int32_t> cu_q = {0, 0, 0}, cu_k = {0, 9, 13};
  for (bool sparse : {false, true}) {
    for (DType t : {DType::f32, DType::bf16, DType::f64}) {
      SCOPED_TRACE(testing::Message() << dtype_name(t) << (sparse ? " sparse" : " warm-up"));
      IndexKLParams e;
      e.seq.n_q = 0, e.seq.n_k = n_k, e.seq.batch = 2;
      e.seq.cu_seqlens_q = cu_q.data(), e.seq.cu_seqlens_k = cu_k.data();
      e.h_q = 4, e.h_kv = 2, e.d = 8, e.d_idx = d_idx, e.dtype = t;
      const int32_t none = -1;
      if (sparse) e.topk_idx = &none, e.topk = 4, e.bk = 8;
      Buf dk(t, n_k * d_idx);
      dk.poison();
      e.dk_idx = dk.data();
      EXPECT_EQ(index_kl_loss(e), 0.0);
      ASSERT_NO_THROW(index_kl_backward(e));
      for (double x : dk.to_double()) ASSERT_EQ(x, 0.0);
    }
  }
}

}  // namespace
}  // namespace msa::test
