# torch.compile(fullgraph=True) of a small MSA layer built from the msa operators, forward and
# backward, against eager execution: the fake implementations and autograd registrations must let
# Dynamo and AOTAutograd trace the operators without graph breaks.
import pytest
import torch

import msa_torch

BK, TOPK = 8, 3


def msa_layer(q, k, v, q_idx, k_idx, cu_q, cu_k):
    topk_idx, _, index_lse = msa_torch.index_topk(q_idx.detach(), k_idx.detach(), cu_q, cu_k, bk=BK, topk=TOPK,
                                                  return_index_lse=True)
    o, lse = msa_torch.sparse_attention(q, k, v, topk_idx, cu_q, cu_k, bk=BK, return_lse=True)
    kl = msa_torch.index_kl_loss(q.detach(), k.detach(), q_idx, k_idx, topk_idx, lse, index_lse, cu_q, cu_k, bk=BK)
    return torch.tanh(o).sum() + 0.1 * kl.float()


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 13, 40], dtype=torch.int32)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    return [leaf(40, 4, 8), leaf(40, 2, 8), leaf(40, 2, 8), leaf(40, 2, 8), leaf(40, 8), cu, cu]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    eager_in, compiled_in = inputs(1), inputs(1)
    want = msa_layer(*eager_in)
    want.backward()
    got = torch.compile(msa_layer, backend=backend, fullgraph=True)(*compiled_in)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b, name in zip(compiled_in[:5], eager_in[:5], ["q", "k", "v", "q_idx", "k_idx"]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
