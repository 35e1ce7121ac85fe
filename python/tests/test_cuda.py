# The msa operators on CUDA tensors against the same operators on the CPU (the reference backend),
# bfloat16 inputs, the shapes the kernels take (d, d_idx, bk in {64, 128}). Skipped, with the
# reason shown by pytest -rs, where no CUDA device is visible or the library has no CUDA support.
# Every operator has a CUDA kernel; the CUDA KL needs the saved main-branch lse and says so.
import pytest
import torch

import msa_torch
import reference as ref

if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible: the CUDA operators were not compared with the CPU",
                allow_module_level=True)
if not torch._C._dispatch_has_kernel_for_dispatch_key("msa::dense_attention_fwd", "CUDA"):
    pytest.skip("libmsa_torch was built without CUDA (no nvcc, or MSA_WITH_CUDA=OFF): CUDA operators not tested",
                allow_module_level=True)

# (name, lens_q, lens_k): a long single sequence, a varlen batch with a tiny and an empty-ish
# sequence, and chunks at the end of their sequences.
LAYOUTS = [("single", [1029], [1029]), ("varlen", [1, 300, 700], [1, 300, 700]), ("chunks", [7, 130], [500, 900])]


def make(layout, d, d_idx, seed, h_q=8, h_kv=2):
    _, lens_q, lens_k = layout
    g = torch.Generator().manual_seed(seed)
    cu_q, cu_k = (None, None) if len(lens_q) == 1 else ref.make_seq(lens_q, lens_k)
    n_q, n_k = sum(lens_q), sum(lens_k)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    return dict(q=randn(n_q, h_q, d), k=randn(n_k, h_kv, d), v=randn(n_k, h_kv, d), q_idx=randn(n_q, h_kv, d_idx),
                k_idx=randn(n_k, d_idx), cu_q=cu_q, cu_k=cu_k)


def to_cuda(x):
    return {name: (t.cuda() if isinstance(t, torch.Tensor) else t) for name, t in x.items()}


def assert_close_rows(actual, expected, what, ulps=4):
    """bfloat16 outputs: within a few bfloat16 ulps (2^-8 relative) of each row's largest value."""
    a, e = actual.double().cpu(), expected.double().cpu()
    row_scale = e.abs().amax(dim=-1, keepdim=True).clamp_min(1e-3)
    err = (a - e).abs() / row_scale
    worst = int(err.argmax())
    idx = torch.unravel_index(torch.tensor(worst), err.shape)
    assert float(err.max()) <= ulps * 2.0**-8, (
        f"{what}: worst relative error {float(err.max()):.3e} at {tuple(int(i) for i in idx)}: "
        f"{float(a.flatten()[worst])} vs {float(e.flatten()[worst])}")


@pytest.mark.parametrize("bk", [64, 128])
@pytest.mark.parametrize("d_idx", [64, 128])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
def test_index_topk_cuda_matches_cpu(layout, d_idx, bk):
    x = make(layout, 64, d_idx, seed=1)
    topk = 8
    args = dict(bk=bk, topk=topk, return_block_scores=True, return_index_lse=True)
    cpu_idx, cpu_scores, cpu_lse = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], **args)
    y = to_cuda(x)
    idx, scores, lse = msa_torch.index_topk(y["q_idx"], y["k_idx"], y["cu_q"], y["cu_k"], **args)
    assert idx.is_cuda and idx.dtype == torch.int32 and idx.shape == cpu_idx.shape
    scores, idx = scores.cpu(), idx.cpu()
    finite = torch.isfinite(cpu_scores)
    assert torch.equal(finite, torch.isfinite(scores)), "block_scores: -inf (invisible blocks) misplaced"
    # float32 accumulation of exact bfloat16 products against double accumulation.
    tol = 1e-5 * cpu_scores[finite].abs().max()
    assert float((scores[finite] - cpu_scores[finite]).abs().max()) <= tol
    # Selections are sets; where they differ (near-ties), the chosen blocks must score the same.
    differ = (idx != cpu_idx).any(dim=2).nonzero()
    for i, r in differ.tolist():
        got = sorted(float(cpu_scores[i, r, b]) for b in idx[i, r] if b >= 0)
        want = sorted(float(cpu_scores[i, r, b]) for b in cpu_idx[i, r] if b >= 0)
        assert len(got) == len(want) and all(abs(a - b) <= tol for a, b in zip(got, want)), (i, r)
    torch.testing.assert_close(lse.cpu(), cpu_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
def test_selection_recall_cuda_matches_cpu(layout):
    x = make(layout, 64, 64, seed=5)
    bk, topk = 64, 4
    sel = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], bk=bk, topk=topk,
                               return_block_scores=True, return_index_lse=True)[0]
    cpu = msa_torch.selection_recall(x["q"], x["k"], sel, x["cu_q"], x["cu_k"], bk=bk, return_rows=True)
    y = to_cuda(x)
    got = msa_torch.selection_recall(y["q"], y["k"], sel.cuda(), y["cu_q"], y["cu_k"], bk=bk, return_rows=True)
    assert got[2].is_cuda and got[2].shape == cpu[2].shape
    # float32 block masses on CUDA, float64 on the CPU: only rows whose oracle is a near tie may differ.
    assert float((got[2].cpu() != cpu[2]).double().mean()) <= 0.02
    assert abs(float(got[0]) - float(cpu[0])) <= 0.02 and abs(float(got[1]) - float(cpu[1])) <= 0.02


def test_block_topk_cuda_matches_cpu():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(1000, 300, generator=g)
    row_blocks = torch.randint(0, 301, (1000,), generator=g, dtype=torch.int32)
    for force_last in (True, False):
        want = msa_torch.block_topk(scores, 16, force_last, row_blocks)
        got = msa_torch.block_topk(scores.cuda(), 16, force_last, row_blocks.cuda())
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_attention_forward_cuda_matches_cpu(sparse, layout, d):
    x = make(layout, d, 64, seed=3)
    bk = 64
    sel = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], bk=bk, topk=8)[0] if sparse else None
    y = to_cuda(x)

    # Reference: the CPU operator in float64 on the same (bfloat16-exact) values.
    def cpu(v):
        q, k = x["q"].double(), x["k"].double()
        if sparse:
            return msa_torch.sparse_attention(q, k, v, sel, x["cu_q"], x["cu_k"], bk=bk, return_lse=True)
        return msa_torch.dense_attention(q, k, v, x["cu_q"], x["cu_k"], return_lse=True)

    if sparse:
        got = msa_torch.sparse_attention(y["q"], y["k"], y["v"], sel.cuda(), y["cu_q"], y["cu_k"], bk=bk,
                                         return_lse=True)
    else:
        got = msa_torch.dense_attention(y["q"], y["k"], y["v"], y["cu_q"], y["cu_k"], return_lse=True)
    want_o, want_lse = cpu(x["v"].double())
    o_absv, _ = cpu(x["v"].double().abs())
    assert got[0].is_cuda and got[0].dtype == torch.bfloat16
    # Derived as in tests/test_cuda_dense_fwd.cpp: the bf16 store rounds by 2^-8 |o|; P rounded to
    # bf16 for the P V product moves o by at most 2^-8 sum_j p_j |v_j| (= attention over |v|), plus
    # fp32 accumulation and exp2 well under 2^-11 of that. lse is fp32: 1e-4 absolute.
    o = got[0].double().cpu()
    tol = 2.0**-8 * want_o.abs() + (2.0**-8 + 2.0**-11) * o_absv + 1e-6
    excess = (o - want_o).abs() - tol
    worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
    assert float(excess.max()) <= 0, f"o: worst element {worst}: {float(o[worst])} vs {float(want_o[worst])}, " \
        f"tolerance {float(tol[worst]):.3e}"
    torch.testing.assert_close(got[1].cpu(), want_lse, rtol=0, atol=1e-4)


def test_forward_runs_on_the_current_stream_and_device_guard():
    x = to_cuda(make(LAYOUTS[1], 64, 64, seed=4))
    want = msa_torch.dense_attention(x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = msa_torch.dense_attention(x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"])
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, want)


def test_mixed_devices_are_rejected():
    x = to_cuda(make(LAYOUTS[1], 64, 64, seed=5))
    with pytest.raises(ValueError, match=r"^msa::dense_attention_fwd: cu_seqlens_q is on cpu, expected cuda:0 like q"):
        msa_torch.dense_attention(x["q"], x["k"], x["v"], x["cu_q"].cpu(), x["cu_k"])
    with pytest.raises(ValueError, match=r"^msa::index_topk: k_idx is on cpu, expected cuda:0 like q_idx"):
        msa_torch.index_topk(x["q_idx"], x["k_idx"].cpu(), x["cu_q"], x["cu_k"], bk=64, topk=8)


def assert_matches(got, expected, what, ulps=8):
    """Gradients: bfloat16 on CUDA against the CPU backend on the same inputs, within a few ulps of
    each row's largest value (the float32 accumulations differ in order)."""
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close_rows(a.float(), b.float(), f"{what}[{i}]", ulps)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_attention_backward_on_cuda(sparse):
    x = make(LAYOUTS[1], 64, 64, seed=6)
    bk = 64
    sel = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], bk=bk, topk=8)[0]

    def grads(t):
        leaves = [t[n].clone().requires_grad_(True) for n in ("q", "k", "v")]
        if sparse:
            o = msa_torch.sparse_attention(*leaves, sel.to(leaves[0].device), t["cu_q"], t["cu_k"], bk=bk)
        else:
            o = msa_torch.dense_attention(*leaves, t["cu_q"], t["cu_k"])
        o.float().square().sum().backward()
        return [leaf.grad for leaf in leaves]

    assert_matches(grads(to_cuda(x)), grads(x), "sparse_attention_backward" if sparse else "dense_attention_backward")


@pytest.mark.parametrize("phase", ["sparse", "warmup"])
def test_kl_on_cuda(phase):
    """The KL value and its gradients (to q_idx, k_idx only) on CUDA match the CPU, for the selected
    support (saved lse and index lse) and the full prefix (saved lse of the dense forward)."""
    x = make(LAYOUTS[1], 64, 64, seed=7)
    bk = 64

    # One selection (and its index lse) for both devices: near-ties could pick different blocks.
    sel0, _, index_lse0 = msa_torch.index_topk(x["q_idx"], x["k_idx"], x["cu_q"], x["cu_k"], bk=bk, topk=4,
                                               return_index_lse=True)

    def run(t):
        sel, index_lse = None, None
        if phase == "sparse":
            dev = t["q"].device
            sel, index_lse = sel0.to(dev), index_lse0.to(dev)
            _, lse = msa_torch.sparse_attention(t["q"], t["k"], t["v"], sel, t["cu_q"], t["cu_k"], bk=bk,
                                                return_lse=True)
        else:
            _, lse = msa_torch.dense_attention(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"], return_lse=True)
        q_idx, k_idx = t["q_idx"].clone().requires_grad_(True), t["k_idx"].clone().requires_grad_(True)
        kl = msa_torch.index_kl_loss(t["q"], t["k"], q_idx, k_idx, sel, lse, index_lse, t["cu_q"], t["cu_k"], bk=bk)
        (kl * 3.0).backward()
        return kl.detach(), q_idx.grad, k_idx.grad

    got, ref_ = run(to_cuda(x)), run(x)
    assert abs(float(got[0]) - float(ref_[0])) <= 1e-2 * abs(float(ref_[0])) + 1e-4, (float(got[0]), float(ref_[0]))
    assert_matches(got[1:], ref_[1:], f"index_kl_backward ({phase})")


def test_kl_on_cuda_needs_the_saved_lse():
    x = to_cuda(make(LAYOUTS[1], 64, 64, seed=8))
    with pytest.raises(ValueError, match=r"^msa::index_kl_loss: .*lse"):
        msa_torch.index_kl_loss(x["q"], x["k"], x["q_idx"], x["k_idx"], None, None, None, x["cu_q"], x["cu_k"], bk=64)
