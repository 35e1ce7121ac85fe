# The msa operators on CPU tensors against naive float64 formulas (tests/reference.py): single
# sequences, varlen batches, chunks aligned to the end of their sequence, explicit positions, and
# strided / expanded inputs. These check the binding (shapes, strides, varlen plumbing, argument
# order); the core library's own tests cover the numerics in depth.
import math

import pytest
import torch

import msa_torch
import reference as ref

# (name, lens_q, lens_k, explicit q_pos)
LAYOUTS = [
    ("single", [129], [129], False),
    ("varlen", [1, 40, 77], [1, 40, 77], False),
    ("chunks", [5, 17], [33, 50], False),
    ("q_pos", [10], [64], True),
]
H_Q, H_KV, D, D_IDX, BK, TOPK = 4, 2, 16, 8, 16, 3


def tolerance(dtype):
    # float64: the same math in another order; float32: a few ulps of the output; bfloat16: the
    # output's rounding (2^-8 relative), a few of them.
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]


def assert_close(actual, expected, dtype, what):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs()
    worst = int(err.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape)) if err.dim() else ()
    assert float(err.max()) <= tolerance(dtype) * float(scale), (
        f"{what}: worst |diff| {float(err.max()):.3e} at {idx}: {float(actual.flatten()[worst])!r} vs "
        f"{float(expected.flatten()[worst])!r} (tolerance {tolerance(dtype)} x {float(scale):.3g})")


def inputs(layout, dtype, seed):
    _, lens_q, lens_k, explicit = layout
    g = torch.Generator().manual_seed(seed)
    n_q, n_k = sum(lens_q), sum(lens_k)
    # A single sequence of equal lengths needs no cu_seqlens; anything else does.
    cu_q, cu_k = (None, None) if lens_q == lens_k and len(lens_q) == 1 else ref.make_seq(lens_q, lens_k)
    q_pos = None
    if explicit:
        q_pos = torch.randint(0, n_k, (n_q,), generator=g, dtype=torch.int32)
        q_pos[0] = n_k - 1  # the last position too

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return dict(q=randn(n_q, H_Q, D), k=randn(n_k, H_KV, D), v=randn(n_k, H_KV, D), q_idx=randn(n_q, H_KV, D_IDX),
                k_idx=randn(n_k, D_IDX), cu_q=cu_q, cu_k=cu_k, q_pos=q_pos)


DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
def test_index_topk_matches_reference(layout, dtype):
    x = inputs(layout, dtype, seed=1)
    n_q, n_k = x["q_idx"].shape[0], x["k_idx"].shape[0]
    topk_idx, scores, lse = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], x["q_pos"], bk=BK,
                                                 topk=TOPK, return_block_scores=True, return_index_lse=True)
    n_blocks = (n_k + BK - 1) // BK
    assert topk_idx.shape == (n_q, H_KV, TOPK) and topk_idx.dtype == torch.int32
    assert scores.shape == (n_q, H_KV, n_blocks) and scores.dtype == torch.float32
    m = ref.block_scores(x["q_idx"], x["k_idx"], BK, n_blocks, cu_q=x["cu_q"], cu_k=x["cu_k"], q_pos=x["q_pos"])
    assert torch.equal(torch.isinf(scores), torch.isinf(m)), "block_scores: -inf (invisible blocks) misplaced"
    finite = torch.isfinite(m)
    assert_close(scores[finite], m[finite], torch.float32, "block_scores")  # float32 output
    pos = ref.positions(n_q, n_k, x["cu_q"], x["cu_k"], x["q_pos"])
    expected = ref.select(m, TOPK, BK, pos)
    rows = (topk_idx != expected).any(dim=2).nonzero()
    assert rows.numel() == 0, f"topk_idx differs in {len(rows)} rows, first {rows[0].tolist()}: " \
        f"{topk_idx[tuple(rows[0])].tolist()} vs {expected[tuple(rows[0])].tolist()}"
    # index_lse: logsumexp of the index scores over the selected support.
    want = torch.empty(n_q, H_KV, dtype=torch.float64)
    for q0, q1, k0, k1, p in ref.sequences(n_q, n_k, x["cu_q"], x["cu_k"], x["q_pos"]):
        for r in range(H_KV):
            s = ref.index_scores(x["q_idx"], x["k_idx"], 0.0, k0, k1, q0, q1, r)
            mask = ref.support(p, k1 - k0, topk_idx[q0:q1, r], BK)
            want[q0:q1, r] = torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=1)
    assert_close(lse, want, torch.float32, "index_lse")


def test_index_topk_optional_outputs_and_k_idx_layouts():
    x = inputs(LAYOUTS[1], torch.float32, seed=2)
    topk_idx, scores, lse = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], bk=BK, topk=TOPK)
    assert scores is None and lse is None
    raw = torch.ops.msa.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], None, BK, TOPK)
    assert raw[1].shape == (0,) and raw[2].shape == (0,)
    again, _, _ = msa_torch.index_topk(x["q_idx"], x["k_idx"].unsqueeze(1), x["cu_q"], x["cu_k"], bk=BK, topk=TOPK)
    assert torch.equal(topk_idx, again)
    # max_seqlen_k narrows block_scores to the longest sequence's blocks.
    _, scores, _ = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], bk=BK, topk=TOPK,
                                        return_block_scores=True, max_seqlen_k=77)
    assert scores.shape[2] == (77 + BK - 1) // BK


def selection_for(x):
    topk_idx, _, _ = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], x["q_pos"], bk=BK, topk=TOPK)
    return topk_idx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_attention_matches_reference(sparse, layout, dtype):
    x = inputs(layout, dtype, seed=3)
    sel = selection_for(x) if sparse else None
    if sparse:
        o, lse = msa_torch.sparse_attention(x["q"], x["k"], x["v"], sel, x["cu_q"], x["cu_k"], x["q_pos"], bk=BK,
                                            return_lse=True)
    else:
        o, lse = msa_torch.dense_attention(x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"], x["q_pos"], return_lse=True)
    want_o, want_lse = ref.attention(x["q"], x["k"], x["v"], sel, BK, 0.0, x["cu_q"], x["cu_k"], x["q_pos"])
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close(o, want_o, dtype, "o")
    assert_close(lse, want_lse, torch.float32, "lse")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_kl_loss_matches_reference(sparse, layout):
    x = inputs(layout, torch.float64, seed=4)
    sel = selection_for(x) if sparse else None
    loss = msa_torch.index_kl_loss(x["q"], x["k"], x["q_idx"], x["k_idx"], sel, cu_seqlens_q=x["cu_q"],
                                   cu_seqlens_k=x["cu_k"], q_pos=x["q_pos"], bk=BK)
    want = ref.kl_loss(x["q"], x["k"], x["q_idx"], x["k_idx"], sel, BK, 0.0, 0.0, x["cu_q"], x["cu_k"], x["q_pos"])
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert abs(float(loss) - float(want)) <= 1e-10 * max(1.0, abs(float(want))), (float(loss), float(want))
    # The saved statistics of the forward passes give the same value.
    if sparse:
        _, lse = msa_torch.sparse_attention(x["q"], x["k"], x["v"], sel, x["cu_q"], x["cu_k"], x["q_pos"], bk=BK,
                                            return_lse=True)
        _, _, index_lse = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], x["q_pos"], bk=BK,
                                               topk=TOPK, return_index_lse=True)
    else:
        _, lse = msa_torch.dense_attention(x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"], x["q_pos"], return_lse=True)
        index_lse = None
    with_stats = msa_torch.index_kl_loss(x["q"], x["k"], x["q_idx"], x["k_idx"], sel, lse, index_lse, x["cu_q"],
                                         x["cu_k"], x["q_pos"], bk=BK)
    # lse is float32: the loss moves by about its rounding.
    assert abs(float(with_stats) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))


def test_block_topk():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(37, 11, generator=g)
    row_blocks = torch.randint(0, 12, (37,), generator=g, dtype=torch.int32)
    out = msa_torch.block_topk(scores, topk=4, force_last=True, row_blocks=row_blocks)
    for i in range(37):
        n = int(row_blocks[i])
        if n == 0:
            want = []
        elif n <= 4:
            want = list(range(n))
        else:
            best = sorted(range(n - 1), key=lambda c: -float(scores[i, c]))[:3]
            want = sorted(best + [n - 1])
        assert out[i].tolist() == want + [-1] * (4 - len(want)), f"row {i}"
    plain = msa_torch.block_topk(scores, topk=4, force_last=False)
    assert torch.equal(plain, scores.topk(4, dim=1).indices.sort(dim=1).values.int())


def test_selection_recall():
    x = inputs(LAYOUTS[1], torch.float64, seed=6)
    sel = selection_for(x)
    block, score, block_rows, score_rows = msa_torch.selection_recall(x["q"], x["k"], sel, x["cu_q"], x["cu_k"],
                                                                      bk=BK, return_rows=True)
    assert block.dtype == torch.float64 and block_rows.shape == (sel.shape[0], H_KV)
    assert abs(float(block) - float(block_rows.double().mean())) < 1e-6
    assert abs(float(score) - float(score_rows.double().mean())) < 1e-6
    assert 0 <= float(score) <= 1 and 0 <= float(block) <= 1
    # The main branch's own top-k (by block mass) recalls itself fully: build it from the reference.
    n_q, n_k = x["q"].shape[0], x["k"].shape[0]
    mass = torch.full((n_q, H_KV, (n_k + BK - 1) // BK), -math.inf, dtype=torch.float64)
    g = H_Q // H_KV
    for q0, q1, k0, k1, p in ref.sequences(n_q, n_k, x["cu_q"], x["cu_k"]):
        mask = ref.support(p, k1 - k0)
        for r in range(H_KV):
            prob = sum(torch.softmax((x["q"][q0:q1, h] @ x["k"][k0:k1, r].T / math.sqrt(D)).masked_fill(~mask, -math.inf),
                                     dim=1) for h in range(r * g, (r + 1) * g)) / g
            for c in range((k1 - k0 + BK - 1) // BK):
                mass[q0:q1, r, c] = prob[:, c * BK:(c + 1) * BK].sum(dim=1)
    best = ref.select(mass, TOPK, BK, ref.positions(n_q, n_k, x["cu_q"], x["cu_k"]))
    block, score = msa_torch.selection_recall(x["q"], x["k"], best, x["cu_q"], x["cu_k"], bk=BK)
    assert float(block) == 1.0 and float(score) == 1.0


def test_strided_and_expanded_inputs():
    """Views with gaps between heads, a transposed layout, and an expanded (stride 0) k_idx give the
    results of contiguous copies."""
    x = inputs(LAYOUTS[0], torch.float32, seed=7)
    n = x["q"].shape[0]
    sel = selection_for(x)
    fused = torch.randn(n, H_Q + 2 * H_KV, 2 * D)  # [q | k | v] heads side by side, padded head dim
    q = fused[:, :H_Q, :D]
    k = fused[:, H_Q:H_Q + H_KV, :D]
    v = fused[:, H_Q + H_KV:, D:]
    assert not q.is_contiguous()
    o = msa_torch.sparse_attention(q, k, v, sel, bk=BK)
    assert torch.equal(o, msa_torch.sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), sel, bk=BK))
    q_t = x["q"].transpose(0, 1).contiguous().transpose(0, 1)  # head-major storage
    assert torch.equal(msa_torch.dense_attention(q_t, x["k"], x["v"]), msa_torch.dense_attention(x["q"], x["k"], x["v"]))
    k_row = torch.randn(1, D_IDX).expand(n, D_IDX)  # every key the same: stride 0
    a, _, _ = msa_torch.index_topk(x["q_idx"], k_row, bk=BK, topk=TOPK)
    b, _, _ = msa_torch.index_topk(x["q_idx"], k_row.contiguous(), bk=BK, topk=TOPK)
    assert torch.equal(a, b)
    # A strided last dim is copied, not misread.
    d_strided = torch.randn(n, H_Q, 2 * D)[:, :, ::2]
    assert torch.equal(msa_torch.dense_attention(d_strided, x["k"], x["v"]),
                       msa_torch.dense_attention(d_strided.contiguous(), x["k"], x["v"]))


def test_empty_inputs():
    q = torch.randn(0, H_Q, D)
    k = torch.randn(0, H_KV, D)
    o, lse = msa_torch.dense_attention(q, k, k, return_lse=True)
    assert o.shape == (0, H_Q, D) and lse.shape == (0, H_Q)
    topk_idx, scores, _ = msa_torch.index_topk(torch.randn(0, H_KV, D_IDX), torch.randn(0, D_IDX), bk=BK, topk=TOPK,
                                               return_block_scores=True)
    assert topk_idx.shape == (0, H_KV, TOPK) and scores.shape == (0, H_KV, 0)
    assert float(msa_torch.index_kl_loss(q, k, torch.randn(0, H_KV, D_IDX), torch.randn(0, D_IDX))) == 0.0


def test_num_threads_follow_torch():
    x = inputs(LAYOUTS[1], torch.float32, seed=8)
    before = torch.get_num_threads()
    want = msa_torch.dense_attention(x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"])
    try:
        torch.set_num_threads(1)
        assert torch.equal(msa_torch.dense_attention(x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"]), want)
    finally:
        torch.set_num_threads(before)
