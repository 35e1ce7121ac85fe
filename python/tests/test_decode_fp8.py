# The FP8 index-key cache (IndexKeyFormat::fp8_e4m3 of msa/decode.h) through the decode operators:
# append_kv into a float8_e4m3fn k_idx_cache + float32 k_idx_scale pool equals, byte for byte, an
# independent torch quantization of the contract; decode_index_topk over it equals the selection
# of the float64 scores of the dequantized query and keys (own block forced, ties toward the lower
# block, NaN below every number); a float8 cache with exactly representable keys selects like the
# native cache; errors name k_idx_scale / k_idx_cache; opcheck. CUDA variants (skipped without a
# GPU) hold the CUDA ops to the CPU ops on identical inputs.
import math
import re

import pytest
import torch

import msa_torch
import reference as ref

ops = torch.ops.msa
FP8 = torch.float8_e4m3fn
H_Q, H_KV, D = 4, 2, 16


def quantize(x):
    """The contract of append_kv on rows x [n, d_idx] (float32 arithmetic): (bytes as FP8, scale)."""
    x = x.float()
    a = x.abs().amax(dim=1)
    finite = torch.isfinite(x).all(dim=1)
    ok = finite & (a >= 2.0**-100)
    inv = torch.full_like(a, 448.0) / torch.where(ok, a, torch.ones_like(a))
    # float32 -> e4m3 in torch rounds to nearest even; past 448 it would give NaN, hence the clamp
    # (the contract saturates).
    q = (x * inv[:, None]).clamp(-448.0, 448.0)
    q = torch.where(ok[:, None], q, torch.zeros_like(q)).to(FP8)
    scale = torch.where(ok, a / 448.0, torch.where(finite, torch.zeros_like(a), torch.full_like(a, math.nan)))
    return q, scale


def dequantize(q8, scale):
    return q8.double() * scale.double().unsqueeze(-1)


def bits(t):
    return t.contiguous().view(torch.uint8)


def cu_of(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


class Paged:
    """Packed keys and an empty paged cache (shuffled pages, bytes 0x7F = NaN and NaN scales in every
    slot, so a slot read before being written poisons the result)."""

    def __init__(self, lens, bk, d_idx, dtype, seed, spare_pages=3):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.bk, self.d_idx, self.dtype = lens, bk, d_idx, dtype
        n_k = sum(lens)
        self.k = torch.randn(n_k, H_KV, D, generator=g, dtype=torch.float64).to(dtype)
        self.v = torch.randn(n_k, H_KV, D, generator=g, dtype=torch.float64).to(dtype)
        # Rows of very different magnitudes: the per-token scale must follow each.
        mag = torch.exp2(torch.randint(-12, 12, (n_k, 1), generator=g).double())
        self.k_idx = (torch.randn(n_k, d_idx, generator=g, dtype=torch.float64) * mag).to(dtype)
        self.cu_k = cu_of(lens)
        blocks = [(n + bk - 1) // bk for n in lens]
        self.n_pages = sum(blocks) + spare_pages
        perm = torch.randperm(self.n_pages, generator=g).tolist()
        self.block_table = torch.full((len(lens), max(blocks) + 2), -1, dtype=torch.int32)
        for b, n in enumerate(lens):
            for j in range(blocks[b]):
                self.block_table[b, j] = perm.pop()
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)

    def empty(self):
        k_cache = torch.full((self.n_pages, self.bk, H_KV, D), math.nan, dtype=self.dtype)
        v_cache = torch.full_like(k_cache, math.nan)
        k_idx_cache = torch.full((self.n_pages, self.bk, self.d_idx), 0x7F, dtype=torch.uint8).view(FP8)
        k_idx_scale = torch.full((self.n_pages, self.bk), math.nan, dtype=torch.float32)
        return k_cache, v_cache, k_idx_cache, k_idx_scale

    def slots(self):
        """(page, slot) of every packed key row."""
        pages, slots = [], []
        for b, n in enumerate(self.lens):
            for t in range(n):
                pages.append(int(self.block_table[b, t // self.bk]))
                slots.append(t % self.bk)
        return torch.tensor(pages, dtype=torch.long), torch.tensor(slots, dtype=torch.long)

    def filled(self):
        """The caches after appending every key (one call), checked against the contract."""
        k_cache, v_cache, k_idx_cache, k_idx_scale = self.empty()
        msa_torch.append_kv(k_cache, v_cache, k_idx_cache, self.block_table, self.seq_lens, self.k, self.v,
                            self.k_idx, self.cu_k, k_idx_scale=k_idx_scale)
        return k_cache, v_cache, k_idx_cache, k_idx_scale


def check_cache_bytes(c, k_idx_cache, k_idx_scale, rows=None):
    """The written slots hold quantize(k_idx) bitwise; every other slot is untouched."""
    pages, slots = c.slots()
    if rows is not None:
        pages, slots = pages[rows], slots[rows]
    want_q, want_s = quantize(c.k_idx if rows is None else c.k_idx[rows])
    got_q, got_s = k_idx_cache[pages, slots], k_idx_scale[pages, slots]
    diff = (bits(got_q) != bits(want_q)).any(dim=1).nonzero().flatten()
    assert diff.numel() == 0, (f"{len(diff)} index keys differ from the torch quantization, first row "
                               f"{int(diff[0])}: {bits(got_q)[diff[0]].tolist()} vs {bits(want_q)[diff[0]].tolist()}")
    sdiff = (bits(got_s) != bits(want_s)).nonzero().flatten()
    assert sdiff.numel() == 0, (f"{len(sdiff)} scales differ, first row {int(sdiff[0])}: "
                                f"{float(got_s[sdiff[0]])!r} vs {float(want_s[sdiff[0]])!r}")
    untouched = torch.ones(k_idx_scale.shape, dtype=torch.bool)
    untouched[pages, slots] = False
    assert bits(k_idx_cache)[untouched].eq(0x7F).all(), "append_kv wrote index-key slots of no new token"
    assert k_idx_scale[untouched].isnan().all(), "append_kv wrote scales of no new token"


def block_max(q, k, bk, len_k, pos, index_scale):
    """M [len_q, n_blocks] float64 of one sequence and group: max of the visible scores per block,
    NaN scores ignored (NaN only when all of a block's visible scores are), -inf where none visible."""
    s = (q[:, None, :] * k[None, :, :]).sum(-1) * index_scale  # one reduction per key: equal keys tie exactly
    visible = torch.arange(len_k)[None, :] <= pos[:, None]
    n_blocks = (len_k + bk - 1) // bk
    m = torch.full((q.shape[0], n_blocks), -math.inf, dtype=torch.float64)
    for c in range(n_blocks):
        sc, vis = s[:, c * bk:(c + 1) * bk], visible[:, c * bk:(c + 1) * bk]
        nan = sc.isnan() & vis
        num = sc.masked_fill(~vis | sc.isnan(), -math.inf).amax(dim=1)
        all_nan = nan.any(dim=1) & ~(vis & ~sc.isnan()).any(dim=1)
        m[:, c] = torch.where(all_nan, torch.full_like(num, math.nan), num)
    return m


def select_row(m_row, own, topk):
    """Own block plus the topk - 1 best earlier blocks (larger first, NaN last, ties to the lower
    block), ascending and -1 padded."""
    key = [(math.isnan(float(m_row[c])), -float(m_row[c]) if not math.isnan(float(m_row[c])) else 0.0, c)
           for c in range(own)]
    best = [c for _, _, c in sorted(key)[:topk - 1]]
    chosen = sorted(best + [own])
    return chosen + [-1] * (topk - len(chosen))


def reference_selection(c, k_idx_cache, k_idx_scale, q_idx, cu_q, topk, index_scale=0.0):
    """The float64 selection of the dequantized query rows and cached keys; also the block scores."""
    n_q, h_kv, d_idx = q_idx.shape
    scale = ref.scale_or_default(index_scale, d_idx)
    qq, qs = quantize(q_idx.reshape(n_q * h_kv, d_idx))
    q64 = dequantize(qq, qs).view(n_q, h_kv, d_idx)
    pages, slots = c.slots()
    k64 = dequantize(k_idx_cache[pages, slots], k_idx_scale[pages, slots])
    out = torch.full((n_q, h_kv, topk), -1, dtype=torch.int32)
    scores = {}
    for q0, q1, k0, k1, pos in ref.sequences(n_q, k64.shape[0], cu_q, c.cu_k):
        for r in range(h_kv):
            m = block_max(q64[q0:q1, r], k64[k0:k1], c.bk, k1 - k0, pos, scale)
            for i in range(q1 - q0):
                own = int(pos[i]) // c.bk
                out[q0 + i, r] = torch.tensor(select_row(m[i], own, topk), dtype=torch.int32)
                scores[(q0 + i, r)] = m[i]
    return out, scores


def assert_same_sets(got, want, what):
    bad = [(i, r) for i in range(got.shape[0]) for r in range(got.shape[1])
           if set(got[i, r].tolist()) != set(want[i, r].tolist())]
    assert not bad, (f"{what}: {len(bad)} of {got.shape[0] * got.shape[1]} rows differ, first {bad[0]}: "
                     f"{got[bad[0]].tolist()} vs {want[bad[0]].tolist()}")


# (bk, topk, d_idx, lens, lens_q): page boundaries, more blocks than topk, a request without
# queries and one without tokens, speculative rows, d_idx of the model (64) and an odd one.
CASES = [
    (16, 3, 8, [1, 15, 16, 17, 100], [1, 2, 16, 1, 5]),
    (8, 4, 64, [0, 41, 7, 64], [0, 3, 7, 16]),
    (32, 2, 33, [129], [4]),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"bk{c[0]}_didx{c[2]}")
def test_fp8_append_then_index_topk_matches_contract(case, dtype):
    bk, topk, d_idx, lens, lens_q = case
    c = Paged(lens, bk, d_idx, dtype, seed=200 + bk)
    # Prompt, then steps of a few tokens per request (page boundaries crossed inside a call).
    k_cache, v_cache, k_idx_cache, k_idx_scale = c.empty()
    g = torch.Generator().manual_seed(201)
    done = [0] * len(lens)
    while done != lens:
        new = [min(int(torch.randint(0, 2 * bk, (), generator=g)), n - d) for n, d in zip(lens, done)]
        rows = torch.cat([torch.arange(int(c.cu_k[b]) + done[b], int(c.cu_k[b]) + done[b] + n)
                          for b, n in enumerate(new)]).long()
        done = [d + n for d, n in zip(done, new)]
        msa_torch.append_kv(k_cache, v_cache, k_idx_cache, c.block_table, torch.tensor(done, dtype=torch.int32),
                            c.k[rows], c.v[rows], c.k_idx[rows], cu_of(new), k_idx_scale=k_idx_scale)
    check_cache_bytes(c, k_idx_cache, k_idx_scale)
    # K/V are copied unchanged.
    pages, slots = c.slots()
    assert torch.equal(bits(k_cache[pages, slots]), bits(c.k)) and torch.equal(bits(v_cache[pages, slots]), bits(c.v))

    n_q = sum(lens_q)
    gq = torch.Generator().manual_seed(202)
    q_idx = torch.randn(n_q, H_KV, d_idx, generator=gq, dtype=torch.float64).to(dtype)
    cu_q = cu_of(lens_q)
    cu = None if len(lens) == 1 else cu_q
    sel, lse = msa_torch.decode_index_topk(q_idx, k_idx_cache, c.block_table, c.seq_lens, cu, topk=topk,
                                           return_index_lse=True, k_idx_scale=k_idx_scale)
    assert sel.shape == (n_q, H_KV, topk) and sel.dtype == torch.int32 and lse.shape == (n_q, H_KV)
    want, _ = reference_selection(c, k_idx_cache, k_idx_scale, q_idx, cu_q, topk)
    assert_same_sets(sel, want, "fp8 selection vs the float64 reference")
    assert torch.isfinite(lse).all()
    # The 4-D single-head view of the cache selects the same.
    again, _ = msa_torch.decode_index_topk(q_idx, k_idx_cache.unsqueeze(2), c.block_table, c.seq_lens, cu,
                                           topk=topk, k_idx_scale=k_idx_scale)
    assert torch.equal(again, sel)
    # The selection drives decode_attention like any other (the K/V cache is in the calls' dtype).
    q = torch.randn(n_q, H_Q, D, generator=gq, dtype=torch.float64).to(dtype)
    o = msa_torch.decode_attention(q, k_cache, v_cache, c.block_table, c.seq_lens, sel, cu)
    want_o = msa_torch.sparse_attention(q, c.k, c.v, sel, cu_q, c.cu_k, bk=bk)
    tol = 1e-6 if dtype != torch.bfloat16 else 2.0**-8
    assert (o.double() - want_o.double()).abs().max() <= tol * max(1.0, float(want_o.double().abs().max()))


def test_fp8_degenerate_rows_ties_and_nan():
    # An all-zero key (scale 0, zero bytes), one below 2^-100 (the same), an infinite one (scale
    # NaN, zero bytes: its score is NaN, ignored by its block's max), a block whose only token is
    # non-finite (block score NaN: ranked below every other), subnormal-range elements, and a
    # duplicated block (equal keys, equal scores: the tie goes to the lower block).
    bk, d_idx = 4, 8
    lens = [40]
    c = Paged(lens, bk, d_idx, torch.float32, seed=210)
    k = c.k_idx
    k[1] = 0.0
    k[2] = 1e-31
    k[5, 3] = math.inf
    k[36] = math.nan  # block 9: positions 36..39; the query at 39 sees it
    k[37:40] = math.nan
    k[9] = torch.tensor([448.0, 2.0**-7, -2.0**-8, 2.0**-9 * 3, 0.0, 1.0, -1.0, 1e-3])
    # Scale exactly 1 and elements at midpoints of e4m3 neighbours: nearest even decides each.
    k[10] = torch.tensor([448.0, 1 + 1 / 16, 1 + 3 / 16, -(1 + 1 / 16), 2.0**-10, 3 * 2.0**-10, 248.0, 0.0])
    k[12:16] = k[20:24]  # blocks 3 and 5 equal
    k_cache, v_cache, k_idx_cache, k_idx_scale = c.filled()
    check_cache_bytes(c, k_idx_cache, k_idx_scale)
    pages, slots = c.slots()
    assert float(k_idx_scale[pages[10], slots[10]]) == 1.0
    assert k_idx_cache[pages[10], slots[10]].float().tolist() == [448.0, 1.0, 1.25, -1.0, 0.0, 2.0**-8, 256.0, 0.0]
    assert float(k_idx_scale[pages[1], slots[1]]) == 0.0 and float(k_idx_scale[pages[2], slots[2]]) == 0.0
    assert math.isnan(float(k_idx_scale[pages[5], slots[5]]))
    assert bits(k_idx_cache[pages[5], slots[5]]).eq(0).all()

    g = torch.Generator().manual_seed(211)
    q_idx = torch.randn(4, H_KV, d_idx, generator=g)
    q_idx[0, 0] = 0.0  # a zero query row: every score 0, ties everywhere -> the lowest blocks
    cu_q = cu_of([4])
    for topk in (2, 4, 7, 10, 16):
        sel, _ = msa_torch.decode_index_topk(q_idx, k_idx_cache, c.block_table, c.seq_lens, None, topk=topk,
                                             k_idx_scale=k_idx_scale)
        want, scores = reference_selection(c, k_idx_cache, k_idx_scale, q_idx, cu_q, topk)
        assert_same_sets(sel, want, f"topk {topk}")
        assert math.isnan(float(scores[(3, 1)][9])), "block 9 should score NaN for the last query"
    # The zero query row ties all blocks: the lowest ones win.
    sel, _ = msa_torch.decode_index_topk(q_idx, k_idx_cache, c.block_table, c.seq_lens, None, topk=4,
                                         k_idx_scale=k_idx_scale)
    assert sel[0, 0].tolist() == [0, 1, 2, 9]
    # Blocks 3 and 5 tie exactly for every query: whenever exactly one of them is kept, it is 3.
    for i in range(4):
        for r in range(H_KV):
            s = set(sel[i, r].tolist())
            assert not (5 in s and 3 not in s), f"row ({i}, {r}) keeps block 5 over the equal block 3: {sorted(s)}"


def test_fp8_representable_keys_select_like_native():
    # Keys and queries that are e4m3 values times a power of two with max |x| = 448 * 2^e quantize
    # exactly; the fp8 cache then selects exactly like the native one of the same values.
    bk, d_idx, topk = 8, 16, 3
    lens, lens_q = [50, 17, 33], [3, 1, 5]
    c = Paged(lens, bk, d_idx, torch.float32, seed=220)
    g = torch.Generator().manual_seed(221)
    codes = torch.randint(0, 0x7F, (sum(lens), d_idx), generator=g, dtype=torch.uint8)
    codes |= torch.randint(0, 2, codes.shape, generator=g, dtype=torch.uint8) << 7
    vals = codes.view(FP8).float()
    vals[:, 0] = 448.0  # max |x| = 448: scale exactly 2^e below
    c.k_idx = vals * torch.exp2(torch.randint(-6, 6, (sum(lens), 1), generator=g).float())
    n_q = sum(lens_q)
    qc = torch.randint(0, 0x7F, (n_q, H_KV, d_idx), generator=g, dtype=torch.uint8)
    q_idx = qc.view(FP8).float()
    q_idx[:, :, 0] = -448.0
    _, _, k_idx_cache, k_idx_scale = c.filled()
    check_cache_bytes(c, k_idx_cache, k_idx_scale)
    cu_q = cu_of(lens_q)
    sel, lse = msa_torch.decode_index_topk(q_idx, k_idx_cache, c.block_table, c.seq_lens, cu_q, topk=topk,
                                           return_index_lse=True, k_idx_scale=k_idx_scale)
    want, _, want_lse = msa_torch.index_topk(q_idx.double(), c.k_idx.double(), cu_q, c.cu_k, bk=bk, topk=topk,
                                             return_index_lse=True)
    assert_same_sets(sel, want, "fp8 vs native on representable keys")
    assert (lse.double() - want_lse).abs().max() <= 1e-5 * max(1.0, float(want_lse.abs().max()))


def test_native_cache_unchanged_by_the_new_argument():
    # The bf16 / float32 path with k_idx_scale=None is the old call: same bytes, same selection.
    c = Paged([37, 12], 8, 8, torch.bfloat16, seed=230)
    k_cache = torch.full((c.n_pages, 8, H_KV, D), math.nan, dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    kic = torch.full((c.n_pages, 8, 8), math.nan, dtype=torch.bfloat16)
    ops.append_kv(k_cache, v_cache, kic, c.block_table, c.seq_lens, c.k, c.v, c.k_idx, c.cu_k)
    kic2 = torch.full_like(kic, math.nan)
    ops.append_kv(k_cache.clone(), v_cache.clone(), kic2, c.block_table, c.seq_lens, c.k, c.v, c.k_idx, c.cu_k, None)
    assert torch.equal(bits(kic), bits(kic2))
    pages, slots = c.slots()
    assert torch.equal(bits(kic[pages, slots]), bits(c.k_idx))
    q_idx = torch.randn(3, H_KV, 8, generator=torch.Generator().manual_seed(231)).to(torch.bfloat16)
    cu_q = cu_of([2, 1])
    a = ops.decode_index_topk(q_idx, kic, c.block_table, c.seq_lens, cu_q, 8, 2, 0.0, True)
    b = ops.decode_index_topk(q_idx, kic, c.block_table, c.seq_lens, cu_q, 8, 2, 0.0, True, None)
    want, _, want_lse = msa_torch.index_topk(q_idx, c.k_idx, cu_q, c.cu_k, bk=8, topk=2, return_index_lse=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], want)


# opcheck's test_schema cannot run on float8 tensors (torch has no float8 arithmetic on the CPU
# for its mutation check), so the alias annotations are checked by hand: append_kv declares, and
# writes, exactly its caches and the scale pool; decode_index_topk writes nothing.
def written_args(op, args):
    before = [bits(a).clone() if isinstance(a, torch.Tensor) else None for a in args]
    op(*args)
    return {i for i, (a, b) in enumerate(zip(args, before)) if b is not None and not torch.equal(bits(a), b)}


def declared_writes(op):
    return {i for i, a in enumerate(op.default._schema.arguments) if a.alias_info is not None and a.alias_info.is_write}


def test_fp8_opcheck():
    c = Paged([5, 37, 20], 8, 8, torch.float32, seed=240)
    k_cache, v_cache, k_idx_cache, k_idx_scale = c.empty()
    args = (k_cache, v_cache, k_idx_cache, c.block_table, c.seq_lens, c.k, c.v, c.k_idx, c.cu_k, k_idx_scale)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.append_kv, args, test_utils=utils)
    assert declared_writes(ops.append_kv) == {0, 1, 2, 9}
    assert written_args(ops.append_kv, [t.clone() if isinstance(t, torch.Tensor) else t for t in args]) == {0, 1, 2, 9}
    _, _, k_idx_cache, k_idx_scale = c.filled()
    q_idx = torch.randn(6, H_KV, 8, generator=torch.Generator().manual_seed(241))
    cu_q = torch.tensor([0, 1, 4, 6], dtype=torch.int32)
    args = (q_idx, k_idx_cache, c.block_table, c.seq_lens, cu_q, 8, 3, 0.0, True, k_idx_scale)
    torch.library.opcheck(ops.decode_index_topk, args, test_utils=utils)
    assert declared_writes(ops.decode_index_topk) == set() and written_args(ops.decode_index_topk, args) == set()


def fp8_step(k_cache, v_cache, k_idx_cache, k_idx_scale, block_table, seq_lens, k, v, k_idx, cu_new, q_idx):
    msa_torch.append_kv(k_cache, v_cache, k_idx_cache, block_table, seq_lens, k, v, k_idx, cu_new,
                        k_idx_scale=k_idx_scale)
    return msa_torch.decode_index_topk(q_idx, k_idx_cache, block_table, seq_lens, cu_new, topk=3,
                                       return_index_lse=True, k_idx_scale=k_idx_scale)


def test_compile_fp8_step_fullgraph():
    # Dynamo traces the in-place fp8 append (k_idx_scale is written through its alias annotation)
    # and the index pass without graph breaks; caches and selection equal eager mode's.
    torch._dynamo.reset()
    c = Paged([20, 9], 8, 8, torch.float32, seed=290)
    new = [3, 2]
    rows = torch.cat([torch.arange(int(c.cu_k[b + 1]) - n, int(c.cu_k[b + 1])) for b, n in enumerate(new)]).long()
    _, _, kic0, ks0 = c.filled()
    q_idx = torch.randn(5, H_KV, 8, generator=torch.Generator().manual_seed(291))
    results = []
    for step in (fp8_step, torch.compile(fp8_step, backend="aot_eager", fullgraph=True)):
        k_cache, v_cache, _, _ = c.empty()
        kic, ks = kic0.clone(), ks0.clone()
        pages, slots = c.slots()
        kic[pages[rows], slots[rows]] = torch.zeros(len(rows), 8, dtype=FP8)  # this step's slots: stale
        ks[pages[rows], slots[rows]] = 7.0
        sel, lse = step(k_cache, v_cache, kic, ks, c.block_table, c.seq_lens, c.k[rows], c.v[rows], c.k_idx[rows],
                        cu_of(new), q_idx)
        results.append((sel, lse, kic, ks))
    (sel, lse, kic, ks), (sel2, lse2, kic2, ks2) = results
    assert torch.equal(bits(kic), bits(kic0)) and torch.equal(bits(kic2), bits(kic0))
    assert torch.equal(bits(ks), bits(ks0)) and torch.equal(bits(ks2), bits(ks0))
    assert torch.equal(sel, sel2) and torch.equal(lse, lse2)


def test_new_index_cache():
    kc, ks = msa_torch.new_index_cache(5, 16, 64, fp8=True)
    assert kc.dtype == FP8 and kc.shape == (5, 16, 64) and ks.dtype == torch.float32 and ks.shape == (5, 16)
    kc, ks = msa_torch.new_index_cache(5, 16, 64, dtype=torch.float32)
    assert kc.dtype == torch.float32 and ks is None


def raises(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_fp8_errors_name_the_argument():
    c = Paged([5, 20], 8, 8, torch.float32, seed=250)
    k_cache, v_cache, k_idx_cache, k_idx_scale = c.empty()
    q_idx = torch.randn(3, H_KV, 8)
    cu_q = torch.tensor([0, 1, 3], dtype=torch.int32)

    def append(kic=k_idx_cache, scale=k_idx_scale, k_idx=c.k_idx):
        return lambda: ops.append_kv(k_cache, v_cache, kic, c.block_table, c.seq_lens, c.k, c.v, k_idx, c.cu_k,
                                     scale)

    def index(kic=k_idx_cache, scale=k_idx_scale):
        return lambda: ops.decode_index_topk(q_idx, kic, c.block_table, c.seq_lens, cu_q, 8, 2, 0.0, False, scale)

    for fn, call in [("append_kv", append), ("decode_index_topk", index)]:
        raises(call(scale=None), f"msa::{fn}: k_idx_scale is None with a float8_e4m3fn k_idx_cache, expected its "
                                 "float32 [n_pages, bk] scale pool")
        raises(call(kic=torch.zeros(7, 8, 8)), f"msa::{fn}: k_idx_scale is given with a float32 k_idx_cache, "
                                              "expected None (scales belong to a float8_e4m3fn index-key cache only)")
        raises(call(scale=k_idx_scale.double()), f"msa::{fn}: k_idx_scale dtype = float64, expected float32")
        raises(call(scale=k_idx_scale[:, :4]),
               f"msa::{fn}: k_idx_scale shape = [7, 4], expected [n_pages, bk] = [7, 8]")
        raises(call(scale=k_idx_scale[:6]), f"msa::{fn}: k_idx_scale shape = [6, 8], expected [n_pages, bk] = [7, 8]")
        raises(call(scale=k_idx_scale.view(7, 8, 1)),
               f"msa::{fn}: k_idx_scale shape = [7, 8, 1], expected [n_pages, bk] = [7, 8]")
        like = "k" if fn == "append_kv" else "q_idx"
        raises(call(kic=torch.zeros(7, 8, 8, dtype=torch.float16)),
               f"msa::{fn}: k_idx_cache dtype = float16, expected float32 like {like} (or float8_e4m3fn with "
               "k_idx_scale for an fp8 index-key cache)")
    # The scale pool append_kv writes must be contiguous; the read-only one may be strided.
    wide = torch.full((7, 16), math.nan)[:, ::2]
    raises(append(scale=wide), "msa::append_kv: k_idx_scale is not contiguous (strides [16, 2]), expected a "
                               "contiguous cache, which append_kv writes in place")
    raises(lambda: ops.append_kv(k_cache, v_cache, None, c.block_table, c.seq_lens, c.k, c.v, None, c.cu_k,
                                 k_idx_scale),
           "msa::append_kv: k_idx_scale is given but k_idx_cache is None, expected None (a layer without an index "
           "branch has no scale pool)")
    # Nothing was written by the failed calls.
    assert bits(k_idx_cache).eq(0x7F).all() and k_idx_scale.isnan().all()
    _, _, kic, ks = c.filled()
    a, _ = ops.decode_index_topk(q_idx, kic, c.block_table, c.seq_lens, cu_q, 8, 2, 0.0, False, ks)
    b, _ = ops.decode_index_topk(q_idx, kic, c.block_table, c.seq_lens, cu_q, 8, 2, 0.0, False,
                                 torch.cat([ks, ks], dim=1)[:, :8])
    assert torch.equal(a, b)


# ---- CUDA: the fp8 ops on CUDA tensors against the CPU ops on identical inputs ----

def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible: the fp8 index cache's CUDA path was not checked")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("msa::decode_index_topk", "CUDA"):
        pytest.skip("libmsa_torch was built without CUDA: the fp8 index cache's CUDA path was not checked")


def cuda_case(lens, bk, d_idx, seed):
    c = Paged(lens, bk, d_idx, torch.bfloat16, seed=seed)
    c.k = torch.randn(sum(lens), H_KV, 128, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    c.v = c.k.flip(0).contiguous()
    return c


def empty_cuda_caches(c):
    k_cache = torch.full((c.n_pages, c.bk, H_KV, 128), math.nan, dtype=torch.bfloat16)
    k_idx_cache = torch.full((c.n_pages, c.bk, c.d_idx), 0x7F, dtype=torch.uint8).view(FP8)
    k_idx_scale = torch.full((c.n_pages, c.bk), math.nan)
    return [k_cache, k_cache.clone(), k_idx_cache, k_idx_scale]


@pytest.mark.parametrize("d_idx", [64, 128])
def test_cuda_fp8_append_kv_matches_cpu(d_idx):
    cuda_or_skip()
    lens, new = [70, 5, 300], [3, 5, 70]
    c = cuda_case(lens, 64, d_idx, seed=260 + d_idx)
    rows = torch.cat([torch.arange(int(c.cu_k[b + 1]) - n, int(c.cu_k[b + 1])) for b, n in enumerate(new)]).long()
    host = empty_cuda_caches(c)
    dev = [t.cuda() for t in host]
    args = (c.block_table, c.seq_lens, c.k[rows], c.v[rows], c.k_idx[rows], cu_of(new))
    msa_torch.append_kv(host[0], host[1], host[2], *args, k_idx_scale=host[3])
    msa_torch.append_kv(dev[0], dev[1], dev[2], *[a.cuda() for a in args], k_idx_scale=dev[3])
    for name, got, want in zip(["k_cache", "v_cache", "k_idx_cache", "k_idx_scale"], dev, host):
        diff = (bits(got.cpu()) != bits(want)).nonzero()
        assert diff.numel() == 0, f"{name}: {len(diff)} bytes differ between CUDA and CPU, first at {diff[0].tolist()}"
    check_cache_bytes(c, host[2], host[3], rows)
    # A scale pool on another device than the cache is named.
    with pytest.raises(ValueError, match=re.escape("msa::append_kv: k_idx_scale is on cpu, expected cuda:0 like k")):
        msa_torch.append_kv(dev[0], dev[1], dev[2], *[a.cuda() for a in args], k_idx_scale=host[3])
    with pytest.raises(ValueError, match=re.escape("msa::decode_index_topk: k_idx_scale is on cpu, expected cuda:0 "
                                                   "like q_idx")):
        msa_torch.decode_index_topk(torch.zeros(1, H_KV, d_idx, dtype=torch.bfloat16, device="cuda"), dev[2],
                                    c.block_table[:1].cuda(), c.seq_lens[:1].cuda(), k_idx_scale=host[3])


def near_optimal(sel, scores, rel_tol):
    """Every kept non-own block scores at least as high as every dropped one, up to rel_tol of the
    row's scale (a float32 sum may reorder near-ties of the float64 reference)."""
    for (i, r), m in scores.items():
        kept = [b for b in sel[i, r].tolist() if b >= 0]
        own = max(kept)
        finite = m[torch.isfinite(m)]
        slack = rel_tol * (1.0 + float(finite.abs().max()) if finite.numel() else 1.0)
        kept_min = min((float(m[b]) for b in kept if b != own), default=math.inf)
        dropped_max = max((float(m[b]) for b in range(own) if b not in kept), default=-math.inf)
        if kept_min < dropped_max - slack:
            return (i, r, kept, kept_min, dropped_max)
    return None


@pytest.mark.parametrize("d_idx", [64, 128])
def test_cuda_fp8_decode_index_topk_matches_cpu(d_idx):
    cuda_or_skip()
    lens, lens_q = [1, 63, 65, 1000], [1, 2, 16, 3]
    c = cuda_case(lens, 64, d_idx, seed=270 + d_idx)
    kc, vc, kic, ks = empty_cuda_caches(c)
    msa_torch.append_kv(kc, vc, kic, c.block_table, c.seq_lens, c.k, c.v, c.k_idx, c.cu_k, k_idx_scale=ks)
    q_idx = torch.randn(sum(lens_q), H_KV, d_idx, generator=torch.Generator().manual_seed(271)).to(torch.bfloat16)
    cu_q = cu_of(lens_q)
    want, want_lse = msa_torch.decode_index_topk(q_idx, kic, c.block_table, c.seq_lens, cu_q, topk=4,
                                                 return_index_lse=True, k_idx_scale=ks)
    got, lse = msa_torch.decode_index_topk(q_idx.cuda(), kic.cuda(), c.block_table.cuda(), c.seq_lens.cuda(),
                                           cu_q.cuda(), topk=4, return_index_lse=True, k_idx_scale=ks.cuda())
    got = got.cpu()
    same = (got == want).all(dim=2).float().mean().item()
    _, scores = reference_selection(c, kic, ks, q_idx, cu_q, 4)
    bad = near_optimal(got, scores, 1e-5)
    assert bad is None, f"CUDA fp8 selection drops a clearly better block: row {bad}"
    # float32 FP8 tensor-core sums against exact float64 ones: near-ties may swap, rarely.
    assert same >= 0.95, f"only {same:.3f} of the rows equal the CPU fp8 selection"
    # index_lse over the same support (rows that selected alike): float32 sums of exact e4m3 products.
    alike = (got == want).all(dim=2)
    err = (lse.cpu().double() - want_lse.double()).abs()[alike].max().item()
    assert err <= 1e-4 * (1 + want_lse.abs().max().item()), f"index_lse cuda vs cpu: worst {err:.3g}"


def test_cuda_fp8_step_in_torch_cuda_graph():
    # append_kv (fp8) + decode_index_topk (fp8) captured with torch.cuda.graph, then replayed with
    # new inputs and a context grown by one token: equal to eager calls on the same inputs.
    cuda_or_skip()
    lens = [300, 70, 129]
    c = cuda_case(lens, 64, 64, seed=280)
    kc, vc, kic, ks = [t.cuda() for t in empty_cuda_caches(c)]
    bt, sl = c.block_table.cuda(), c.seq_lens.cuda()
    sl -= 1  # the prompt: all but the last token of each request
    pre = torch.cat([torch.arange(int(c.cu_k[b]), int(c.cu_k[b + 1]) - 1) for b in range(3)]).long()
    msa_torch.append_kv(kc, vc, kic, bt, sl, c.k[pre].cuda(), c.v[pre].cuda(), c.k_idx[pre].cuda(),
                        cu_of([n - 1 for n in lens]).cuda(), k_idx_scale=ks)
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device="cuda")
    g = torch.Generator().manual_seed(281)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16).cuda()

    k_new, ki_new, q_idx = rand(3, H_KV, 128), rand(3, 64), rand(3, H_KV, 64)

    def step(kc, vc, kic, ks):
        msa_torch.append_kv(kc, vc, kic, bt, sl, k_new, k_new, ki_new, cu, k_idx_scale=ks)
        return msa_torch.decode_index_topk(q_idx, kic, bt, sl, cu, topk=3, k_idx_scale=ks)[0]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step(*[t.clone() for t in (kc, vc, kic, ks)])
    torch.cuda.current_stream().wait_stream(s)
    before = [t.clone() for t in (kc, vc, kic, ks)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel_graph = step(kc, vc, kic, ks)
    sl += 1  # the step's token is the last one of each request now
    k_new.copy_(rand(3, H_KV, 128))
    ki_new.copy_(rand(3, 64))
    q_idx.copy_(rand(3, H_KV, 64))
    graph.replay()
    torch.cuda.synchronize()
    sel = step(*before)
    torch.cuda.synchronize()
    assert torch.equal(sel_graph, sel)
    assert torch.equal(bits(kic), bits(before[2])) and torch.equal(bits(ks), bits(before[3]))
