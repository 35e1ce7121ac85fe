# Bad arguments raise ValueError whose message names the operator and the argument: the torch
# layer's own tensor checks (shape, dtype, int32 index tensors) and the core library's msa::Error,
# passed through with exactly its message.
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import msa_torch

ops = torch.ops.msa


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(q=torch.randn(6, 4, 8, generator=g), k=torch.randn(6, 2, 8, generator=g),
                q_idx=torch.randn(6, 2, 8, generator=g), k_idx=torch.randn(6, 8, generator=g))


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def raises(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_core_errors_keep_their_message():
    x = tensors()
    raises(lambda: msa_torch.index_topk(x["q_idx"], x["k_idx"], topk=0),
           "msa::index_topk: topk = 0, expected 1 <= topk <= 32")
    raises(lambda: msa_torch.dense_attention(x["q"], torch.randn(6, 3, 8), torch.randn(6, 3, 8)),
           "msa::dense_attention_forward: h_q = 4, expected a multiple of h_kv = 3")
    raises(lambda: msa_torch.index_topk(x["q_idx"], x["k_idx"], bk=0),
           "msa::index_topk: bk = 0, expected 1 <= bk <= 4096")
    raises(lambda: msa_torch.dense_attention(x["q"], x["k"], x["k"], scale=-1.0),
           "msa::dense_attention_forward: scale = -1, expected a finite positive number (or 0 for the default)")


def test_core_errors_leave_the_library_usable():
    # An error must not disturb the next call: the same bad call again, then a good one.
    x = tensors(1)
    for _ in range(3):
        with pytest.raises(ValueError, match="topk = 0"):
            msa_torch.index_topk(x["q_idx"], x["k_idx"], topk=0)
    o = msa_torch.dense_attention(x["q"], x["k"], x["k"])
    assert o.shape == x["q"].shape and torch.isfinite(o).all()


# A C++ exception that cannot be unwound takes the whole interpreter down (a build of the layer
# once did this on a GPU machine): run the core error path in a child process, so that a crash is
# reported with its signal instead of ending the test session.
def test_core_error_in_a_child_process():
    script = textwrap.dedent("""
        import torch, msa_torch
        try:
            msa_torch.dense_attention(torch.randn(6, 4, 8), torch.randn(6, 3, 8), torch.randn(6, 3, 8))
        except ValueError as e:
            print("ValueError:", e)
        try:
            msa_torch.index_topk(torch.randn(6, 2, 8), torch.randn(6, 8), topk=0)
        except ValueError as e:
            print("ValueError:", e)
    """)
    python_dir = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([python_dir, *sys.path]))
    env["MSA_TORCH_LIBRARY"] = msa_torch.library_path
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"child exited with {r.returncode} (negative: killed by that signal)\n{r.stderr[-2000:]}"
    assert r.stdout.splitlines() == [
        "ValueError: msa::dense_attention_forward: h_q = 4, expected a multiple of h_kv = 3",
        "ValueError: msa::index_topk: topk = 0, expected 1 <= topk <= 32",
    ]


def test_core_rejects_bad_selections_and_sequences():
    x = tensors()
    sel = torch.full((6, 2, 2), -1, dtype=torch.int32)
    sel[:, :, 0] = 0
    sel[0, 0, 1] = 1  # query 0 cannot see block 1
    with pytest.raises(ValueError, match=re.escape("msa::sparse_attention_forward: topk_idx[0, 0, 1] = 1")):
        msa_torch.sparse_attention(x["q"], x["k"], x["k"], sel, bk=2)
    with pytest.raises(ValueError, match=r"^msa::dense_attention_forward: .*cu_seqlens_q"):
        msa_torch.dense_attention(x["q"], x["k"], x["k"], i32(0, 4, 3), i32(0, 4, 6))


def test_tensor_checks_name_the_argument():
    x = tensors()
    q, k = x["q"], x["k"]
    raises(lambda: msa_torch.dense_attention(q[0], k, k),
           "msa::dense_attention_fwd: q shape = [4, 8], expected [n_q, h_q, d]")
    raises(lambda: msa_torch.dense_attention(q, k.double(), k),
           "msa::dense_attention_fwd: k dtype = float64, expected float32 like q")
    raises(lambda: msa_torch.dense_attention(q, k, k[:, :, :4]),
           "msa::dense_attention_fwd: v shape = [6, 2, 4], expected [n_k, h_kv, d] = [6, 2, 8]")
    raises(lambda: msa_torch.dense_attention(q.int(), k, k),
           "msa::dense_attention_fwd: q dtype = int32, expected float32, bfloat16 or float64")
    raises(lambda: msa_torch.dense_attention(q, k, k, torch.tensor([0, 6])),
           "msa::dense_attention_fwd: cu_seqlens_q dtype = int64, expected int32")
    raises(lambda: msa_torch.dense_attention(q, k, k, i32(0, 6), i32(0, 2, 6)),
           "msa::dense_attention_fwd: cu_seqlens_k shape = [3], expected [batch + 1] = [2]")
    raises(lambda: msa_torch.dense_attention(q, k, k, i32(0)),
           "msa::dense_attention_fwd: cu_seqlens_q shape = [1], expected [batch + 1] with batch >= 1")
    raises(lambda: msa_torch.dense_attention(q, k, k, q_pos=i32(0, 1)),
           "msa::dense_attention_fwd: q_pos shape = [2], expected [n_q] = [6]")
    raises(lambda: msa_torch.sparse_attention(q, k, k, torch.zeros(6, 1, 2, dtype=torch.int32)),
           "msa::sparse_attention_fwd: topk_idx shape = [6, 1, 2], expected [n_q, h_kv, topk] = [6, 2, *]")
    raises(lambda: msa_torch.sparse_attention(q, k, k, torch.zeros(6, 2, 2)),
           "msa::sparse_attention_fwd: topk_idx dtype = float32, expected int32")
    raises(lambda: msa_torch.index_topk(x["q_idx"], x["k_idx"][:, :4]),
           "msa::index_topk: k_idx shape = [6, 4], expected [n_k, d_idx] = [*, 8]")
    raises(lambda: msa_torch.index_topk(x["q_idx"], x["k_idx"].view(6, 2, 4)),
           "msa::index_topk: k_idx shape = [6, 2, 4], expected [n_k, 1, d_idx] = [*, 1, 8]")
    raises(lambda: msa_torch.block_topk(torch.randn(3, 4).double()),
           "msa::block_topk: scores dtype = float64, expected float32")
    raises(lambda: msa_torch.index_kl_loss(q, k, x["q_idx"][:, :1], x["k_idx"]),
           "msa::index_kl_loss: q_idx shape = [6, 1, 8], expected [n_q, h_kv, d_idx] = [6, 2, *]")
    raises(lambda: ops.index_kl_bwd(q, k, x["q_idx"], x["k_idx"], lambda_=torch.ones(2)),
           "msa::index_kl_bwd: lambda_ shape = [2], expected a single element")
    o, lse = ops.dense_attention_fwd(q, k, k)
    raises(lambda: ops.dense_attention_bwd(o, q, k, k, o, lse.double()),
           "msa::dense_attention_bwd: lse dtype = float64, expected float32")

