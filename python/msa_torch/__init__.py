"""msa_torch: the msa operators (MiniMax Sparse Attention) for PyTorch.

Loads libmsa_torch (which registers torch.ops.msa.*), adds the fake implementations that
torch.compile and torch.export trace with, wires the backward operators into autograd, and
offers Python wrappers. Tensors are packed ("THD"): q [n_q, h_q, d], k and v [n_k, h_kv, d],
q_idx [n_q, h_kv, d_idx], k_idx [n_k, d_idx] (or [n_k, 1, d_idx]); cu_seqlens_q/k [batch + 1],
q_pos [n_q] and topk_idx [n_q, h_kv, topk] are int32 on the same device. A scale of 0 means
1/sqrt(head dim). Bad arguments raise ValueError naming the operator and the argument.

The library is looked for in $MSA_TORCH_LIBRARY, next to this file, then in the repository's
build/lib (where scripts/setup.sh builds it).
"""

import os
from pathlib import Path

import torch

__all__ = [
    "library_path",
    "index_topk",
    "block_topk",
    "sparse_attention",
    "dense_attention",
    "index_kl_loss",
    "selection_recall",
    "append_kv",
    "decode_index_topk",
    "decode_attention",
    "new_index_cache",
]


def _find_library():
    name = "libmsa_torch.so"
    env = os.environ.get("MSA_TORCH_LIBRARY")
    if env:
        if not Path(env).is_file():
            raise ImportError(f"msa_torch: MSA_TORCH_LIBRARY = {env} is not a file")
        return str(Path(env).resolve())
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parents[1] / "build" / "lib" / name):
        if candidate.is_file():
            return str(candidate)
    raise ImportError(
        f"msa_torch: {name} not found next to {here} nor in the repository's build/lib; build it "
        "(bash scripts/setup_torch.sh && bash scripts/setup.sh) or set MSA_TORCH_LIBRARY"
    )


library_path = _find_library()
torch.ops.load_library(library_path)
_ops = torch.ops.msa


# ---- fake implementations: output shapes only, for FakeTensor tracing (torch.compile, export) ----

def _blocks(n, bk):
    return (n + bk - 1) // bk if bk > 0 else 0


@torch.library.register_fake("msa::index_topk")
def _(q_idx, k_idx, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, bk=128, topk=16, index_scale=0.0,
      return_block_scores=False, return_index_lse=False, max_seqlen_k=None):
    n_q, h_kv = q_idx.shape[0], q_idx.shape[1]
    n_blocks = _blocks(k_idx.shape[0] if max_seqlen_k is None else max_seqlen_k, bk)
    topk_idx = q_idx.new_empty((n_q, h_kv, max(topk, 0)), dtype=torch.int32)
    scores = q_idx.new_empty((n_q, h_kv, n_blocks) if return_block_scores else (0,), dtype=torch.float32)
    lse = q_idx.new_empty((n_q, h_kv) if return_index_lse else (0,), dtype=torch.float32)
    return topk_idx, scores, lse


@torch.library.register_fake("msa::block_topk")
def _(scores, topk=16, force_last=True, row_blocks=None):
    return scores.new_empty((scores.shape[0], max(topk, 0)), dtype=torch.int32)


def _attention_fwd_fake(q):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.register_fake("msa::sparse_attention_fwd")
def _(q, k, v, topk_idx, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, bk=128, scale=0.0):
    return _attention_fwd_fake(q)


@torch.library.register_fake("msa::dense_attention_fwd")
def _(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, scale=0.0):
    return _attention_fwd_fake(q)


@torch.library.register_fake("msa::sparse_attention_bwd")
def _(do_, q, k, v, o, lse, topk_idx, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, bk=128, scale=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


@torch.library.register_fake("msa::dense_attention_bwd")
def _(do_, q, k, v, o, lse, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, scale=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


@torch.library.register_fake("msa::index_kl_loss")
def _(q, k, q_idx, k_idx, topk_idx=None, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, lse=None,
      index_lse=None, bk=128, scale=0.0, index_scale=0.0):
    return q.new_empty((), dtype=torch.float64)


@torch.library.register_fake("msa::index_kl_bwd")
def _(q, k, q_idx, k_idx, topk_idx=None, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, lse=None,
      index_lse=None, bk=128, scale=0.0, index_scale=0.0, lambda_=None):
    return q_idx.new_empty(q_idx.shape), k_idx.new_empty(k_idx.shape)


@torch.library.register_fake("msa::selection_recall")
def _(q, k, topk_idx, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, bk=128, scale=0.0):
    rows = (q.shape[0], k.shape[1])
    f64 = q.new_empty((), dtype=torch.float64)
    return f64, q.new_empty((), dtype=torch.float64), q.new_empty(rows, dtype=torch.float32), \
        q.new_empty(rows, dtype=torch.float32)


# Decode (inference only: no autograd). append_kv mutates its caches and returns nothing.
@torch.library.register_fake("msa::append_kv")
def _(k_cache, v_cache, k_idx_cache, block_table, seq_lens, k, v, k_idx=None, cu_new=None, k_idx_scale=None):
    return None


@torch.library.register_fake("msa::decode_index_topk")
def _(q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q=None, bk=128, topk=16, index_scale=0.0,
      return_index_lse=False, k_idx_scale=None):
    n_q, h_kv = q_idx.shape[0], q_idx.shape[1]
    topk_idx = q_idx.new_empty((n_q, h_kv, max(topk, 0)), dtype=torch.int32)
    lse = q_idx.new_empty((n_q, h_kv) if return_index_lse else (0,), dtype=torch.float32)
    return topk_idx, lse


@torch.library.register_fake("msa::decode_attention")
def _(q, k_cache, v_cache, block_table, seq_lens, topk_idx, cu_seqlens_q=None, bk=128, scale=0.0):
    return _attention_fwd_fake(q)

# ---- autograd ----
# lse is an output for later use (the KL loss, combining partial results), not differentiable:
# the backward kernels take the gradient of o only.

def _attention_setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, *[t if isinstance(t, torch.Tensor) else None for t in inputs[3:7]])
    ctx.rest = inputs[7:]


def _sparse_attention_setup(ctx, inputs, output):
    _attention_setup(ctx, inputs, output)


def _sparse_attention_backward(ctx, do, dlse):
    q, k, v, o, lse, topk_idx, cu_q, cu_k, q_pos = ctx.saved_tensors
    bk, scale = ctx.rest
    dq, dk, dv = _ops.sparse_attention_bwd(do, q, k, v, o, lse, topk_idx, cu_q, cu_k, q_pos, bk, scale)
    return dq, dk, dv, None, None, None, None, None, None


def _dense_attention_setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, *inputs[3:6])
    ctx.scale = inputs[6]


def _dense_attention_backward(ctx, do, dlse):
    q, k, v, o, lse, cu_q, cu_k, q_pos = ctx.saved_tensors
    dq, dk, dv = _ops.dense_attention_bwd(do, q, k, v, o, lse, cu_q, cu_k, q_pos, ctx.scale)
    return dq, dk, dv, None, None, None, None


# The KL trains the index branch only: the teacher (q, k) and the saved statistics are constants,
# and the incoming gradient is the lambda of index_kl_bwd.
def _kl_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10])
    ctx.rest = inputs[10:]


def _kl_backward(ctx, grad):
    q, k, q_idx, k_idx, topk_idx, cu_q, cu_k, q_pos, lse, index_lse = ctx.saved_tensors
    bk, scale, index_scale = ctx.rest
    dq_idx, dk_idx = _ops.index_kl_bwd(q, k, q_idx, k_idx, topk_idx, cu_q, cu_k, q_pos, lse, index_lse, bk, scale,
                                       index_scale, grad)
    return None, None, dq_idx, dk_idx, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("msa::sparse_attention_fwd", _sparse_attention_backward,
                                setup_context=_sparse_attention_setup)
torch.library.register_autograd("msa::dense_attention_fwd", _dense_attention_backward,
                                setup_context=_dense_attention_setup)
torch.library.register_autograd("msa::index_kl_loss", _kl_backward, setup_context=_kl_setup)


# ---- Python API ----

def index_topk(q_idx, k_idx, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, *, bk=128, topk=16, index_scale=0.0,
               return_block_scores=False, return_index_lse=False, max_seqlen_k=None):
    """Top-k block selection of the index branch.

    Returns (topk_idx int32 [n_q, h_kv, topk], block_scores float32 [n_q, h_kv, n_blocks] or None,
    index_lse float32 [n_q, h_kv] or None). n_blocks = ceil(max_seqlen_k / bk), max_seqlen_k
    defaulting to n_k. Not differentiable (a selection).
    """
    topk_idx, scores, lse = _ops.index_topk(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, q_pos, bk, topk, index_scale,
                                            return_block_scores, return_index_lse, max_seqlen_k)
    return topk_idx, scores if return_block_scores else None, lse if return_index_lse else None


def block_topk(scores, topk=16, force_last=True, row_blocks=None):
    """Top-k columns of float32 scores [rows, n_blocks]: int32 [rows, topk], ascending, -1 padded."""
    return _ops.block_topk(scores, topk, force_last, row_blocks)


def sparse_attention(q, k, v, topk_idx, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, *, bk=128, scale=0.0,
                     return_lse=False):
    """Exact softmax attention over the blocks in topk_idx. Differentiable in q, k, v.

    Returns o [n_q, h_q, d], or (o, lse float32 [n_q, h_q]) with return_lse (lse carries no gradient).
    """
    o, lse = _ops.sparse_attention_fwd(q, k, v, topk_idx, cu_seqlens_q, cu_seqlens_k, q_pos, bk, scale)
    return (o, lse) if return_lse else o


def dense_attention(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, *, scale=0.0, return_lse=False):
    """Dense causal attention. Differentiable in q, k, v; returns o, or (o, lse) with return_lse."""
    o, lse = _ops.dense_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, scale)
    return (o, lse) if return_lse else o


def index_kl_loss(q, k, q_idx, k_idx, topk_idx=None, lse=None, index_lse=None, cu_seqlens_q=None, cu_seqlens_k=None,
                  q_pos=None, *, bk=128, scale=0.0, index_scale=0.0):
    """KL alignment loss L_KL (float64 scalar) of the index branch toward the main branch.

    On the blocks of topk_idx, or the full causal prefix without it. lse / index_lse are the saved
    statistics of the forward passes (optional). Differentiable in q_idx and k_idx only: the teacher
    q, k get no gradient; scale the loss (loss * lambda) to weight it.
    """
    return _ops.index_kl_loss(q, k, q_idx, k_idx, topk_idx, cu_seqlens_q, cu_seqlens_k, q_pos, lse, index_lse, bk,
                              scale, index_scale)


def selection_recall(q, k, topk_idx, cu_seqlens_q=None, cu_seqlens_k=None, q_pos=None, *, bk=128, scale=0.0,
                     return_rows=False):
    """Block and score recall of topk_idx against the main branch's own top-k (float64 scalars).

    With return_rows, also the per-row values float32 [n_q, h_kv] of each.
    """
    block, score, block_rows, score_rows = _ops.selection_recall(q, k, topk_idx, cu_seqlens_q, cu_seqlens_k, q_pos,
                                                                 bk, scale)
    return (block, score, block_rows, score_rows) if return_rows else (block, score)

# ---- decode over a paged KV cache (inference only) ----
# The cache: k_cache, v_cache [n_pages, bk, h_kv, d] and k_idx_cache [n_pages, bk, d_idx], contiguous;
# a page holds one MSA block of bk tokens. block_table int32 [batch, max_blocks] maps logical block
# j of request b to its page (entries past ceil(seq_lens[b] / bk) are not read, -1 by convention);
# seq_lens int32 [batch] counts the tokens in the cache, this step's new ones included. The query
# tokens of request b (packed rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]) are its last cached tokens.
# CPU and CUDA tensors (CUDA: bfloat16, d 64 or 128, bk a multiple of 16 up to 256; the current
# stream; workspace from torch's caching allocator).
# The index-key cache may be FP8 (msa/decode.h, IndexKeyFormat::fp8_e4m3): k_idx_cache of dtype
# torch.float8_e4m3fn plus its scale pool k_idx_scale float32 [n_pages, bk] (new_index_cache makes
# both); a token's key is k_idx_cache[page, slot].float() * k_idx_scale[page, slot]. The index pass
# over it reads half the bytes and selects approximately like the native cache.

def new_index_cache(n_pages, bk, d_idx, *, fp8=False, dtype=torch.bfloat16, device=None):
    """An empty index-key cache: (k_idx_cache [n_pages, bk, d_idx], k_idx_scale [n_pages, bk] or None).

    fp8: float8_e4m3fn bytes and a float32 scale per token; otherwise dtype (the calls' dtype) and
    no scales. Zero-filled, so unwritten slots hold a zero key.
    """
    if not fp8:
        return torch.zeros(n_pages, bk, d_idx, dtype=dtype, device=device), None
    return (torch.zeros(n_pages, bk, d_idx, dtype=torch.float8_e4m3fn, device=device),
            torch.zeros(n_pages, bk, dtype=torch.float32, device=device))


def append_kv(k_cache, v_cache, k_idx_cache, block_table, seq_lens, k, v, k_idx=None, cu_new=None, *,
              k_idx_scale=None):
    """Writes the new tokens' k, v [n_new, h_kv, d] and k_idx [n_new, d_idx] into the caches, in place.

    Token t of request b (packed row cu_new[b] + t; cu_new may be None for a batch of one) goes to
    position seq_lens[b] - n_new_b + t. Grow seq_lens and give new blocks a page before the call.
    k_idx_cache and k_idx are both None for a layer without an index branch. With a float8_e4m3fn
    k_idx_cache, k_idx_scale (its float32 [n_pages, bk] scale pool) is required and each k_idx row
    is quantized into the two. Returns None.
    """
    _ops.append_kv(k_cache, v_cache, k_idx_cache, block_table, seq_lens, k, v, k_idx, cu_new, k_idx_scale)


def decode_index_topk(q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q=None, *, topk=16, index_scale=0.0,
                      return_index_lse=False, bk=None, k_idx_scale=None):
    """index_topk of the query tokens q_idx [n_q, h_kv, d_idx] over their request's cached index keys.

    Returns (topk_idx int32 [n_q, h_kv, topk], index_lse float32 [n_q, h_kv] or None). The block
    numbers are logical (the j of block_table[b, j]), as in a prefill selection of the same
    sequence, and feed decode_attention unchanged. bk defaults to the page size, k_idx_cache.shape[1].
    A float8_e4m3fn k_idx_cache needs its k_idx_scale; the query rows are then quantized the same way.
    """
    bk = k_idx_cache.shape[1] if bk is None else bk
    topk_idx, lse = _ops.decode_index_topk(q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q, bk, topk,
                                           index_scale, return_index_lse, k_idx_scale)
    return topk_idx, lse if return_index_lse else None


def decode_attention(q, k_cache, v_cache, block_table, seq_lens, topk_idx, cu_seqlens_q=None, *, scale=0.0,
                     return_lse=False, bk=None):
    """sparse_attention of the query tokens q [n_q, h_q, d] over the cached blocks listed in topk_idx.

    topk_idx None: dense decode, every visible cached token (a dense layer, or the dense baseline).
    Returns o [n_q, h_q, d], or (o, lse float32 [n_q, h_q]) with return_lse. Not differentiable.
    bk defaults to the page size, k_cache.shape[1].
    """
    bk = k_cache.shape[1] if bk is None else bk
    o, lse = _ops.decode_attention(q, k_cache, v_cache, block_table, seq_lens, topk_idx, cu_seqlens_q, bk, scale)
    return (o, lse) if return_lse else o
