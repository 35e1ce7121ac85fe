# Naive float64 formulas of the msa operations (MSA_SPEC), written with plain torch and loops over
# sequences and heads, independent of the library; plus input builders for the tests.
import math

import torch


def scale_or_default(scale, d):
    """The scale the library uses: a float32 field, 0 meaning 1/sqrt(d)."""
    return float(torch.tensor(scale or 1.0 / math.sqrt(d), dtype=torch.float32))


def make_seq(lens_q, lens_k, device="cpu"):
    """cu_seqlens_q/k int32 for sequences of the given query and key lengths."""
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    return cu_q, cu_k


def sequences(n_q, n_k, cu_q=None, cu_k=None, q_pos=None):
    """Yields (q0, q1, k0, k1, positions) per sequence; positions are absolute, bottom-right aligned
    unless q_pos is given."""
    cq = [0, n_q] if cu_q is None else cu_q.tolist()
    ck = (cq if n_k == n_q else [0, n_k]) if cu_k is None else cu_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q_pos is not None:
            pos = q_pos[q0:q1].long().cpu()
        else:
            pos = torch.arange(q1 - q0) + (k1 - k0) - (q1 - q0)
        yield q0, q1, k0, k1, pos


def support(pos, len_k, sel=None, bk=None):
    """[len_q, len_k] bool: visible keys, restricted to the selected blocks sel [len_q, topk]."""
    j = torch.arange(len_k)
    mask = j[None, :] <= pos[:, None]
    if sel is not None:
        blocks = j // bk
        chosen = torch.zeros_like(mask)
        for t in range(sel.shape[1]):
            chosen |= (sel[:, t:t + 1].long().cpu() == blocks[None, :])
        mask &= chosen
    return mask


def attention(q, k, v, topk_idx=None, bk=128, scale=0.0, cu_q=None, cu_k=None, q_pos=None):
    """(o, lse) of sparse (topk_idx given) or dense causal attention, in float64."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    n_q, h_q, d = q.shape
    h_kv = k.shape[1]
    g = h_q // h_kv
    scale = scale_or_default(scale, d)
    o = torch.zeros(n_q, h_q, d, dtype=torch.float64)
    lse = torch.zeros(n_q, h_q, dtype=torch.float64)
    for q0, q1, k0, k1, pos in sequences(n_q, k.shape[0], cu_q, cu_k, q_pos):
        for h in range(h_q):
            r = h // g
            sel = None if topk_idx is None else topk_idx[q0:q1, r]
            mask = support(pos, k1 - k0, sel, bk)
            s = (q[q0:q1, h] @ k[k0:k1, r].T) * scale
            s = s.masked_fill(~mask, -math.inf)
            lse[q0:q1, h] = torch.logsumexp(s, dim=1)
            o[q0:q1, h] = torch.softmax(s, dim=1) @ v[k0:k1, r]
    return o, lse


def index_scores(q_idx, k_idx, index_scale, k0, k1, q0, q1, r):
    d_idx = q_idx.shape[-1]
    scale = scale_or_default(index_scale, d_idx)
    return (q_idx[q0:q1, r].double().cpu() @ k_idx.reshape(k_idx.shape[0], d_idx)[k0:k1].double().cpu().T) * scale


def block_scores(q_idx, k_idx, bk, n_blocks, index_scale=0.0, cu_q=None, cu_k=None, q_pos=None):
    """M [n_q, h_kv, n_blocks]: max index score over the visible tokens of each block, -inf where none."""
    n_q, h_kv, _ = q_idx.shape
    m = torch.full((n_q, h_kv, n_blocks), -math.inf, dtype=torch.float64)
    for q0, q1, k0, k1, pos in sequences(n_q, k_idx.shape[0], cu_q, cu_k, q_pos):
        mask = support(pos, k1 - k0)
        for r in range(h_kv):
            s = index_scores(q_idx, k_idx, index_scale, k0, k1, q0, q1, r).masked_fill(~mask, -math.inf)
            for c in range((k1 - k0 + bk - 1) // bk):
                m[q0:q1, r, c] = s[:, c * bk:(c + 1) * bk].max(dim=1).values
    return m


def select(m, topk, bk, pos_of_rows):
    """The spec's selection from block scores m [n_q, h_kv, n_blocks]: own block plus the best
    topk - 1 other visible blocks, ascending, -1 padded (random scores: no ties to break)."""
    n_q, h_kv, _ = m.shape
    out = torch.full((n_q, h_kv, topk), -1, dtype=torch.int32)
    for i in range(n_q):
        own = int(pos_of_rows[i]) // bk
        for r in range(h_kv):
            # Blocks before the own one are fully visible.
            best = sorted(range(own), key=lambda c: -float(m[i, r, c]))[:topk - 1]
            chosen = sorted(best + [own])
            out[i, r, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def positions(n_q, n_k, cu_q=None, cu_k=None, q_pos=None):
    pos = torch.zeros(n_q, dtype=torch.long)
    for q0, q1, _, _, p in sequences(n_q, n_k, cu_q, cu_k, q_pos):
        pos[q0:q1] = p
    return pos


def kl_loss(q, k, q_idx, k_idx, topk_idx=None, bk=128, scale=0.0, index_scale=0.0, cu_q=None, cu_k=None,
            q_pos=None):
    """L_KL: mean over (query, group) of KL(group-mean attention || index softmax) on the support."""
    q, k = q.double().cpu(), k.double().cpu()
    n_q, h_q, d = q.shape
    h_kv = k.shape[1]
    g = h_q // h_kv
    scale = scale_or_default(scale, d)
    total = torch.zeros((), dtype=torch.float64)
    for q0, q1, k0, k1, pos in sequences(n_q, k.shape[0], cu_q, cu_k, q_pos):
        for r in range(h_kv):
            sel = None if topk_idx is None else topk_idx[q0:q1, r]
            mask = support(pos, k1 - k0, sel, bk)
            teacher = torch.zeros(q1 - q0, k1 - k0, dtype=torch.float64)
            for h in range(r * g, (r + 1) * g):
                s = (q[q0:q1, h] @ k[k0:k1, r].T * scale).masked_fill(~mask, -math.inf)
                teacher += torch.softmax(s, dim=1) / g
            s_idx = index_scores(q_idx, k_idx, index_scale, k0, k1, q0, q1, r).masked_fill(~mask, -math.inf)
            log_student = torch.log_softmax(s_idx, dim=1)
            terms = torch.where(teacher > 0, teacher * (teacher.clamp_min(1e-300).log() - log_student),
                                torch.zeros_like(teacher))
            total += terms.sum()
    return total / (n_q * h_kv)
