// trainer/ops.cpp — autograd wrappers (torch::autograd::Function) over the msa_torch operators.
#include "ops.h"

#include <torch/csrc/autograd/custom_function.h>

#include <limits>

#include "msa_torch.h"

namespace msa::train {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

OptTensor opt(const at::IValue& v) { return v.isNone() ? OptTensor() : OptTensor(v.toTensor()); }

// The selection is an input of the function (so that it is saved with the graph) but never
// differentiable: the top-k is a constant of the backward.
struct SparseAttentionFn : torch::autograd::Function<SparseAttentionFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& topk_idx, const OptTensor& cu, int64_t bk, double scale) {
    auto [o, lse] = msa_torch::sparse_attention_fwd(q, k, v, topk_idx, cu, cu, std::nullopt, bk, scale);
    ctx->save_for_backward({q, k, v, o, lse, topk_idx});
    ctx->saved_data["cu"] = cu.has_value() ? at::IValue(*cu) : at::IValue();
    ctx->saved_data["bk"] = bk;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {o, lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    Tensor d_o = grads[0].defined() ? grads[0] : at::zeros_like(s[3]);
    auto [dq, dk, dv] = msa_torch::sparse_attention_bwd(
        d_o, s[0], s[1], s[2], s[3], s[4], s[5], opt(ctx->saved_data["cu"]), opt(ctx->saved_data["cu"]), std::nullopt,
        ctx->saved_data["bk"].toInt(), ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct DenseAttentionFn : torch::autograd::Function<DenseAttentionFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& cu, double scale) {
    auto [o, lse] = msa_torch::dense_attention_fwd(q, k, v, cu, cu, std::nullopt, scale);
    ctx->save_for_backward({q, k, v, o, lse});
    ctx->saved_data["cu"] = cu.has_value() ? at::IValue(*cu) : at::IValue();
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {o, lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    Tensor d_o = grads[0].defined() ? grads[0] : at::zeros_like(s[3]);
    auto [dq, dk, dv] =
        msa_torch::dense_attention_bwd(d_o, s[0], s[1], s[2], s[3], s[4], opt(ctx->saved_data["cu"]),
                                       opt(ctx->saved_data["cu"]), std::nullopt, ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, Tensor(), Tensor()};
  }
};

// q and k enter as detached tensors (the teacher is a constant), so the graph only has edges to
// q_idx and k_idx; the optional statistics and the selection are saved as plain data.
struct IndexKLFn : torch::autograd::Function<IndexKLFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q_idx, const Tensor& k_idx, const Tensor& q,
                               const Tensor& k, const OptTensor& topk_idx, const OptTensor& cu, const OptTensor& lse,
                               const OptTensor& index_lse, int64_t bk, double scale, double index_scale,
                               bool compute_value) {
    Tensor loss;
    if (compute_value) {
      loss = msa_torch::index_kl_loss(q, k, q_idx, k_idx, topk_idx, cu, cu, std::nullopt, lse, index_lse, bk, scale,
                                      index_scale);
    } else {
      loss = at::full({}, std::numeric_limits<double>::quiet_NaN(), q_idx.options().dtype(at::kDouble));
    }
    ctx->save_for_backward({q_idx, k_idx, q, k});
    auto iv = [](const OptTensor& t) { return t.has_value() ? at::IValue(*t) : at::IValue(); };
    ctx->saved_data["topk_idx"] = iv(topk_idx);
    ctx->saved_data["cu"] = iv(cu);
    ctx->saved_data["lse"] = iv(lse);
    ctx->saved_data["index_lse"] = iv(index_lse);
    ctx->saved_data["bk"] = bk;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["index_scale"] = index_scale;
    return {loss};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto& m = ctx->saved_data;
    Tensor lambda = grads[0].defined() ? grads[0].to(at::kCPU, at::kDouble) : at::ones({}, at::kDouble);
    auto [dq_idx, dk_idx] = msa_torch::index_kl_bwd(
        s[2], s[3], s[0], s[1], opt(m["topk_idx"]), opt(m["cu"]), opt(m["cu"]), std::nullopt, opt(m["lse"]),
        opt(m["index_lse"]), m["bk"].toInt(), m["scale"].toDouble(), m["index_scale"].toDouble(), lambda);
    return {dq_idx,   dk_idx,   Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

std::pair<Tensor, Tensor> sparse_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& topk_idx,
                                           const std::optional<Tensor>& cu_seqlens, int64_t bk, double scale) {
  auto out = SparseAttentionFn::apply(q, k, v, topk_idx, cu_seqlens, bk, scale);
  return {out[0], out[1]};
}

std::pair<Tensor, Tensor> dense_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const std::optional<Tensor>& cu_seqlens, double scale) {
  auto out = DenseAttentionFn::apply(q, k, v, cu_seqlens, scale);
  return {out[0], out[1]};
}

Tensor index_kl(const Tensor& q, const Tensor& k, const Tensor& q_idx, const Tensor& k_idx,
                const std::optional<Tensor>& topk_idx, const std::optional<Tensor>& cu_seqlens,
                const std::optional<Tensor>& lse, const std::optional<Tensor>& index_lse, int64_t bk, double scale,
                double index_scale, bool compute_value) {
  auto det = [](const std::optional<Tensor>& t) { return t ? std::optional<Tensor>(t->detach()) : t; };
  return IndexKLFn::apply(q_idx, k_idx, q.detach(), k.detach(), det(topk_idx), cu_seqlens, det(lse), det(index_lse), bk,
                          scale, index_scale, compute_value)[0];
}

}  // namespace msa::train
