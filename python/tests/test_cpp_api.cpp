// The C++ face of the torch layer (python/csrc/msa_torch.h) without Python: the functions called
// directly on at::Tensor, and the same operators through the dispatcher (torch.ops.msa.* from C++).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/randn.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "msa_torch.h"

namespace {

at::Tensor randn(at::IntArrayRef shape) { return at::randn(shape, at::TensorOptions().dtype(at::kDouble)); }

TEST(TorchCppApi, SparseWithEveryBlockEqualsDense) {
  at::manual_seed(1);
  const int64_t n = 77, h_q = 4, h_kv = 2, d = 16, d_idx = 8, bk = 8;
  at::Tensor q = randn({n, h_q, d}), k = randn({n, h_kv, d}), v = randn({n, h_kv, d});
  at::Tensor q_idx = randn({n, h_kv, d_idx}), k_idx = randn({n, d_idx});
  const int64_t n_blocks = (n + bk - 1) / bk;
  auto [topk_idx, scores, lse_idx] =
      msa_torch::index_topk(q_idx, k_idx, {}, {}, {}, bk, n_blocks, 0.0, true, false, std::nullopt);
  EXPECT_EQ(topk_idx.sizes(), (std::vector<int64_t>{n, h_kv, n_blocks}));
  EXPECT_EQ(scores.sizes(), (std::vector<int64_t>{n, h_kv, n_blocks}));
  EXPECT_EQ(lse_idx.numel(), 0);  // not asked for
  // The last query sees every block, in ascending order.
  EXPECT_TRUE(at::equal(topk_idx[n - 1][0], at::arange(n_blocks, topk_idx.options())));

  auto [o_s, lse_s] = msa_torch::sparse_attention_fwd(q, k, v, topk_idx, {}, {}, {}, bk, 0.0);
  auto [o_d, lse_d] = msa_torch::dense_attention_fwd(q, k, v, {}, {}, {}, 0.0);
  EXPECT_TRUE(at::allclose(o_s, o_d, 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(lse_s, lse_d, 1e-6, 1e-6));  // lse is float32

  at::Tensor do_ = randn({n, h_q, d});
  auto [dq_s, dk_s, dv_s] = msa_torch::sparse_attention_bwd(do_, q, k, v, o_s, lse_s, topk_idx, {}, {}, {}, bk, 0.0);
  auto [dq_d, dk_d, dv_d] = msa_torch::dense_attention_bwd(do_, q, k, v, o_d, lse_d, {}, {}, {}, 0.0);
  EXPECT_TRUE(at::allclose(dq_s, dq_d, 1e-6, 1e-9));
  EXPECT_TRUE(at::allclose(dk_s, dk_d, 1e-6, 1e-9));
  EXPECT_TRUE(at::allclose(dv_s, dv_d, 1e-6, 1e-9));
}

TEST(TorchCppApi, DispatcherCallMatchesDirectCall) {
  at::manual_seed(2);
  at::Tensor q = randn({9, 2, 8}), k = randn({9, 1, 8}), v = randn({9, 1, 8});
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("msa::dense_attention_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double)>();
  auto [o1, lse1] = op.call(q, k, v, {}, {}, {}, 0.0);
  auto [o2, lse2] = msa_torch::dense_attention_fwd(q, k, v, {}, {}, {}, 0.0);
  EXPECT_TRUE(at::equal(o1, o2));
  EXPECT_TRUE(at::equal(lse1, lse2));
}

TEST(TorchCppApi, KlLossAndBackward) {
  at::manual_seed(3);
  at::Tensor q = randn({20, 4, 8}), k = randn({20, 2, 8}), q_idx = randn({20, 2, 8}), k_idx = randn({20, 8});
  at::Tensor loss = msa_torch::index_kl_loss(q, k, q_idx, k_idx, {}, {}, {}, {}, {}, {}, 128, 0.0, 0.0);
  EXPECT_EQ(loss.dim(), 0);
  EXPECT_EQ(loss.scalar_type(), at::kDouble);
  EXPECT_GT(loss.item<double>(), 0.0);
  at::Tensor lambda = at::full({}, 2.0, at::TensorOptions().dtype(at::kDouble));
  auto [dq_idx, dk_idx] = msa_torch::index_kl_bwd(q, k, q_idx, k_idx, {}, {}, {}, {}, {}, {}, 128, 0.0, 0.0, lambda);
  auto [dq_one, dk_one] = msa_torch::index_kl_bwd(q, k, q_idx, k_idx, {}, {}, {}, {}, {}, {}, 128, 0.0, 0.0, {});
  EXPECT_TRUE(at::allclose(dq_idx, at::mul(dq_one, 2.0), 1e-12, 0.0));
  EXPECT_TRUE(at::allclose(dk_idx, at::mul(dk_one, 2.0), 1e-12, 0.0));
}

TEST(TorchCppApi, BadArgumentsThrowValueErrorNamingThem) {
  at::Tensor q_idx = randn({6, 2, 8}), k_idx = randn({6, 8});
  try {
    msa_torch::index_topk(q_idx, k_idx, {}, {}, {}, 128, 0, 0.0, false, false, std::nullopt);
    FAIL() << "topk = 0 was accepted";
  } catch (const c10::ValueError& e) {
    EXPECT_EQ(std::string(e.what_without_backtrace()), "msa::index_topk: topk = 0, expected 1 <= topk <= 32");
  }
  try {
    msa_torch::index_topk(q_idx, k_idx.to(at::kFloat), {}, {}, {}, 128, 4, 0.0, false, false, std::nullopt);
    FAIL() << "mixed dtypes were accepted";
  } catch (const c10::ValueError& e) {
    EXPECT_EQ(std::string(e.what_without_backtrace()),
              "msa::index_topk: k_idx dtype = float32, expected float64 like q_idx");
  }
}

}  // namespace
