// trainer/ops.h — differentiable msa attention for LibTorch C++ code: autograd wrappers over the
// msa_torch operators (python/csrc/msa_torch.h). For the trainer's model and any C++ user who
// trains with msa (link the msa_trainer library).
//
// Layouts are those of msa_torch.h (packed "THD"). The backward of each wrapper is the matching
// msa_torch backward operator; a device whose kernel is missing throws from that operator (the
// error names the operator and the device) instead of copying to the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

namespace msa::train {

using at::Tensor;

// Sparse causal attention over the selected key blocks topk_idx [n_q, h_kv, topk] (a constant):
// returns (o [n_q, h_q, d], lse float32 [n_q, h_q]); o is differentiable in q, k, v; lse is not.
std::pair<Tensor, Tensor> sparse_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& topk_idx,
                                           const std::optional<Tensor>& cu_seqlens, int64_t bk, double scale = 0.0);

// Dense causal attention: (o, lse), o differentiable in q, k, v.
std::pair<Tensor, Tensor> dense_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const std::optional<Tensor>& cu_seqlens, double scale = 0.0);

// The KL alignment loss L_KL of one layer (MSA_SPEC "KL alignment loss") as a float64 0-dim
// tensor. Its gradient reaches q_idx and k_idx only: q and k are the teacher and are treated as
// constants (pass them detached or not, no gradient flows to them either way). topk_idx absent =
// the full causal prefix (warm-up), present = the selected support (sparse phase). lse / index_lse
// are the saved statistics of that support (attention forward / index_topk), or absent to
// recompute them.
//
// compute_value = false skips the forward computation (the paper's training kernels never run
// one): the returned value is NaN, the gradient is exact. Use it on steps that do not log.
Tensor index_kl(const Tensor& q, const Tensor& k, const Tensor& q_idx, const Tensor& k_idx,
                const std::optional<Tensor>& topk_idx, const std::optional<Tensor>& cu_seqlens,
                const std::optional<Tensor>& lse, const std::optional<Tensor>& index_lse, int64_t bk,
                double scale = 0.0, double index_scale = 0.0, bool compute_value = true);

}  // namespace msa::train
