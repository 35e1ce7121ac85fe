# Autograd through the msa operators: torch.autograd.gradcheck in float64 (finite differences
# against the backward operators) for sparse and dense attention in q, k, v and for the KL loss in
# q_idx, k_idx; the teacher q, k of the KL get no gradient; the incoming gradient scales the KL's.
import pytest
import torch

import msa_torch
import reference as ref

H_Q, H_KV, D, D_IDX, BK, TOPK = 4, 2, 4, 4, 4, 3

# (name, lens_q, lens_k): a single sequence, and a varlen batch whose second entry is a chunk at the
# end of its sequence.
LAYOUTS = [("single", [21], [21]), ("varlen_chunk", [9, 5], [9, 14])]


def make(layout, seed):
    _, lens_q, lens_k = layout
    g = torch.Generator().manual_seed(seed)
    cu_q, cu_k = (None, None) if len(lens_q) == 1 else ref.make_seq(lens_q, lens_k)
    n_q, n_k = sum(lens_q), sum(lens_k)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x = dict(q=randn(n_q, H_Q, D), k=randn(n_k, H_KV, D), v=randn(n_k, H_KV, D), q_idx=randn(n_q, H_KV, D_IDX),
             k_idx=randn(n_k, D_IDX), cu_q=cu_q, cu_k=cu_k)
    x["topk_idx"], _, _ = msa_torch.index_topk(x["q_idx"].detach(), x["k_idx"].detach(), cu_q, cu_k, bk=BK,
                                               topk=TOPK)
    return x


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
def test_sparse_attention_gradcheck(layout):
    x = make(layout, 1)
    assert (x["topk_idx"] == -1).any()  # early queries see fewer than topk blocks: -1 padding

    def f(q, k, v):
        return msa_torch.sparse_attention(q, k, v, x["topk_idx"], x["cu_q"], x["cu_k"], bk=BK, scale=0.3)

    assert torch.autograd.gradcheck(f, (x["q"], x["k"], x["v"]))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
def test_dense_attention_gradcheck(layout):
    x = make(layout, 2)

    def f(q, k, v):
        return msa_torch.dense_attention(q, k, v, x["cu_q"], x["cu_k"])

    assert torch.autograd.gradcheck(f, (x["q"], x["k"], x["v"]))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_kl_gradcheck(sparse, layout):
    x = make(layout, 3)
    sel = x["topk_idx"] if sparse else None
    q, k = x["q"].detach(), x["k"].detach()

    def f(q_idx, k_idx):
        return msa_torch.index_kl_loss(q, k, q_idx, k_idx, sel, cu_seqlens_q=x["cu_q"], cu_seqlens_k=x["cu_k"], bk=BK)

    assert torch.autograd.gradcheck(f, (x["q_idx"], x["k_idx"]))


def test_kl_gradient_goes_to_the_index_branch_only_and_scales_with_lambda():
    x = make(LAYOUTS[1], 4)
    k_idx3 = x["k_idx"].detach().unsqueeze(1).requires_grad_(True)  # the [n_k, 1, d_idx] layout too
    loss = msa_torch.index_kl_loss(x["q"], x["k"], x["q_idx"], k_idx3, x["topk_idx"], cu_seqlens_q=x["cu_q"],
                                   cu_seqlens_k=x["cu_k"], bk=BK)
    assert loss.requires_grad
    (0.25 * loss).backward()
    assert x["q"].grad is None and x["k"].grad is None, "the teacher (q, k) must get no gradient"
    assert k_idx3.grad.shape == k_idx3.shape
    # lambda = 0.25 arrives as the incoming gradient: the same as index_kl_bwd with lambda_ = 0.25.
    dq_idx, dk_idx = torch.ops.msa.index_kl_bwd(x["q"].detach(), x["k"].detach(), x["q_idx"].detach(),
                                                x["k_idx"].detach(), x["topk_idx"], x["cu_q"], x["cu_k"], None, None,
                                                None, BK, 0.0, 0.0, torch.tensor(0.25, dtype=torch.float64))
    assert torch.equal(x["q_idx"].grad, dq_idx)
    assert torch.equal(k_idx3.grad.squeeze(1), dk_idx)
    one_q, _ = torch.ops.msa.index_kl_bwd(x["q"].detach(), x["k"].detach(), x["q_idx"].detach(), x["k_idx"].detach(),
                                          x["topk_idx"], x["cu_q"], x["cu_k"], None, None, None, BK)
    torch.testing.assert_close(dq_idx, 0.25 * one_q, rtol=1e-12, atol=0)


def test_attention_lse_is_not_differentiable_and_grads_match_backward_op():
    x = make(LAYOUTS[1], 5)
    o, lse = msa_torch.sparse_attention(x["q"], x["k"], x["v"], x["topk_idx"], x["cu_q"], x["cu_k"], bk=BK,
                                        return_lse=True)
    assert o.requires_grad and not lse.requires_grad
    do = torch.randn_like(o)
    o.backward(do)
    dq, dk, dv = torch.ops.msa.sparse_attention_bwd(do, x["q"].detach(), x["k"].detach(), x["v"].detach(),
                                                    o.detach(), lse, x["topk_idx"], x["cu_q"], x["cu_k"], None, BK)
    assert torch.equal(x["q"].grad, dq) and torch.equal(x["k"].grad, dk) and torch.equal(x["v"].grad, dv)


def test_sparse_with_all_blocks_equals_dense_gradients():
    """topk >= the number of blocks selects everything: sparse and dense gradients agree."""
    x = make(LAYOUTS[0], 6)
    n = x["q"].shape[0]
    everything, _, _ = msa_torch.index_topk(x["q_idx"].detach(), x["k_idx"].detach(), bk=BK, topk=(n + BK - 1) // BK)
    grads = []
    for f in (lambda q, k, v: msa_torch.sparse_attention(q, k, v, everything, bk=BK),
              lambda q, k, v: msa_torch.dense_attention(q, k, v)):
        leaves = [t.detach().requires_grad_(True) for t in (x["q"], x["k"], x["v"])]
        (f(*leaves) ** 2).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
