# torch.library.opcheck on every msa operator with CPU tensors: schema, fake implementation,
# autograd registration and AOT dispatch (static and dynamic shapes) agree with the real kernel.
import pytest
import torch

import msa_torch  # noqa: F401  (registers the fake implementations and autograd)
import reference as ref

ops = torch.ops.msa
H_Q, H_KV, D, D_IDX, BK, TOPK = 4, 2, 8, 8, 8, 3
# bfloat16 where the CUDA kernels take it; float32 and float64 everywhere.
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make(dtype, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    cu_q, cu_k = ref.make_seq([3, 20], [9, 30])

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)

    n_q, n_k = 23, 39
    x = dict(q=randn(n_q, H_Q, D, grad=requires_grad), k=randn(n_k, H_KV, D, grad=requires_grad),
             v=randn(n_k, H_KV, D, grad=requires_grad), q_idx=randn(n_q, H_KV, D_IDX, grad=requires_grad),
             k_idx=randn(n_k, D_IDX, grad=requires_grad), cu_q=cu_q, cu_k=cu_k)
    x["topk_idx"], _, _ = ops.index_topk(x["q_idx"].detach(), x["k_idx"].detach(), cu_q, cu_k, None, BK, TOPK)
    return x


def check(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_index_topk(dtype):
    x = make(dtype, 1)
    check(ops.index_topk, (x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], None, BK, TOPK, 0.0, True, True))
    check(ops.index_topk, (x["q_idx"][3:], x["k_idx"][19:]), dict(bk=BK, topk=TOPK, return_block_scores=True))


def test_block_topk():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(17, 9, generator=g)
    check(ops.block_topk, (scores, 4, True, torch.randint(0, 10, (17,), generator=g, dtype=torch.int32)))
    check(ops.block_topk, (scores, 4, False))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_attention(dtype):
    x = make(dtype, 3, requires_grad=dtype != torch.bfloat16)
    args = (x["q"], x["k"], x["v"], x["topk_idx"], x["cu_q"], x["cu_k"], None, BK, 0.0)
    check(ops.sparse_attention_fwd, args)
    o, lse = ops.sparse_attention_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    do = torch.randn_like(o)
    check(ops.sparse_attention_bwd, (do, x["q"].detach(), x["k"].detach(), x["v"].detach(), o, lse, x["topk_idx"],
                                     x["cu_q"], x["cu_k"], None, BK, 0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_attention(dtype):
    x = make(dtype, 4, requires_grad=dtype != torch.bfloat16)
    args = (x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"], None, 0.0)
    check(ops.dense_attention_fwd, args)
    o, lse = ops.dense_attention_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    check(ops.dense_attention_bwd, (torch.randn_like(o), x["q"].detach(), x["k"].detach(), x["v"].detach(), o, lse,
                                    x["cu_q"], x["cu_k"], None, 0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_index_kl(sparse, dtype):
    x = make(dtype, 5, requires_grad=dtype != torch.bfloat16)
    sel = x["topk_idx"] if sparse else None
    check(ops.index_kl_loss, (x["q"].detach(), x["k"].detach(), x["q_idx"], x["k_idx"], sel, x["cu_q"], x["cu_k"],
                              None, None, None, BK))
    plain = [x[n].detach() for n in ("q", "k", "q_idx", "k_idx")]
    check(ops.index_kl_bwd, (*plain, sel, x["cu_q"], x["cu_k"], None, None, None, BK, 0.0, 0.0,
                             torch.tensor(0.5, dtype=torch.float64)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selection_recall(dtype):
    x = make(dtype, 6)
    check(ops.selection_recall, (x["q"], x["k"], x["topk_idx"], x["cu_q"], x["cu_k"], None, BK, 0.0))
