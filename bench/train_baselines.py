"""PyTorch baselines for `msa bench train`, measured on the same GPU in the same session.

Dense causal attention with GQA, forward + backward timed together, through PyTorch SDPA:
scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) on random normal bf16
[1, h, n, d] tensors at the M3 shape (h_q = 64, h_kv = 4, d = 128), then torch.autograd.grad of the
output against (q, k, v) with a random normal bf16 gradient (no .grad accumulation). Backends forced
one at a time with sdpa_kernel: cuDNN, then FLASH (skipped with its error where it refuses GQA).
FLOPs: 3.5 x the forward's exact causal count 4 * h_q * d * n (n + 1) / 2 (forward 1 + backward 2.5),
as msa's dense fwd+bwd row.

Check per case: every gradient finite; the last query's output and dq of two heads, and dk / dv
of the last key (only the last query sees it), against a float32 recomputation from the last
query's row (relative L2).

Timing as msa bench (bench/prefill_baselines.py's time_calls): CUDA events around each call,
queued back to back; the first call warms up and sizes the repetitions (up to --iters within
~--budget-s seconds, median reported). The JSON is rewritten after every measurement.

    python3 bench/train_baselines.py --n 32768,131072 --json train_baselines.json
"""

import argparse
import math
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prefill_baselines import driver_version, time_calls  # noqa: E402

H_Q, H_KV, D = 64, 4, 128
G = H_Q // H_KV
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def rel_l2(got, ref):
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_last_query(q, k, v, grad, o, dq, dk, dv, n):
    """Float32 recomputation of what depends on the last query's row only: its output and dq, and
    dk / dv of the last key (no other query sees it). Heads 0 and h_q - 1 (groups 0 and h_kv - 1)."""
    worst = {"o": 0.0, "dq": 0.0, "dk_last": 0.0, "dv_last": 0.0}
    scale = 1.0 / math.sqrt(D)
    for r in (0, H_KV - 1):
        kr, vr = k[0, r].float(), v[0, r].float()  # [n, d]
        dk_last = torch.zeros(D, device=q.device)
        dv_last = torch.zeros(D, device=q.device)
        for h in range(r * G, (r + 1) * G):
            qi, gi = q[0, h, n - 1].float(), grad[0, h, n - 1].float()
            p = torch.softmax((kr @ qi) * scale, dim=0)  # [n]
            oi = p @ vr
            dp = vr @ gi  # [n]
            ds = p * (dp - (gi * oi).sum())
            dv_last += p[n - 1] * gi
            dk_last += ds[n - 1] * scale * qi
            if h in (0, H_Q - 1):
                worst["o"] = max(worst["o"], rel_l2(o[0, h, n - 1], oi))
                worst["dq"] = max(worst["dq"], rel_l2(dq[0, h, n - 1], (ds @ kr) * scale))
        worst["dk_last"] = max(worst["dk_last"], rel_l2(dk[0, r, n - 1], dk_last))
        worst["dv_last"] = max(worst["dv_last"], rel_l2(dv[0, r, n - 1], dv_last))
    return worst


def sdpa_train_case(n, backend, iters, budget_ms, seed):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed + n)
    q = torch.randn(1, H_Q, n, D, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(1, H_KV, n, D, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(1, H_KV, n, D, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    grad = torch.randn(1, H_Q, n, D, device=dev, dtype=torch.bfloat16, generator=gen)
    flops = 3.5 * 4.0 * H_Q * D * n * (n + 1) / 2
    case = {"n": n, "backend": backend, "gqa": "enable_gqa", "flops": flops,
            "what": "scaled_dot_product_attention(is_causal=True, enable_gqa=True) + torch.autograd.grad(o, (q, k, v), "
                    "grad_o)"}
    out = {}

    def call():
        out.clear()  # at 128K q, o and dq are 2 GiB each: never hold two sets
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out["dq"], out["dk"], out["dv"] = torch.autograd.grad(o, (q, k, v), grad)
        out["o"] = o.detach()

    try:
        with sdpa_kernel(BACKENDS[backend]):
            t = time_calls(call, iters, budget_ms)
    except RuntimeError as e:
        # A backend that refuses this case (GQA, length, dtype): recorded, not expanded, so that
        # the row measures what the backend runs for the layer as it is.
        out.clear()
        case["error"] = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return case
    case.update(t)
    case["tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
    finite = all(bool(torch.isfinite(out[x]).all().item()) for x in ("o", "dq", "dk", "dv"))
    with torch.no_grad():
        worst = check_last_query(q.detach(), k.detach(), v.detach(), grad, out["o"], out["dq"], out["dk"], out["dv"], n)
    case["check_rel_l2"] = worst
    case["check_finite"] = finite
    case["check_pass"] = bool(finite and max(worst.values()) < 3e-2)
    out.clear()
    return case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="32768,131072")
    ap.add_argument("--backends", default="cudnn,flash")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    budget_ms = args.budget_s * 1e3
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in BACKENDS:
            sys.exit(f"train_baselines: unknown backend {b!r} (cudnn, flash)")
    props = torch.cuda.get_device_properties(0)
    res = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "driver": driver_version(),
           "command": "python3 bench/train_baselines.py " + " ".join(sys.argv[1:]),
           "timing": f"CUDA events, first call warms up and sizes the runs: up to {args.iters} within "
                     f"~{args.budget_s:g} s, median; forward + backward timed together",
           "sdpa_fwd_bwd": []}

    def save():
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)

    print(f"train_baselines: {props.name}, torch {torch.__version__}, cuDNN {res['cudnn']}, driver {res['driver']}",
          flush=True)
    for n in sorted(int(x) for x in args.n.split(",")):
        for backend in backends:
            free, _ = torch.cuda.mem_get_info()
            # q, o, grad, dq (+ k, v, dk, dv), the float32 check rows, slack for the backend's workspace.
            need = 2 * (4 * H_Q + 4 * H_KV) * n * D + 8 * H_Q * n
            if need * 1.25 > free:
                c = {"n": n, "backend": backend, "skipped": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
            else:
                try:
                    c = sdpa_train_case(n, backend, args.iters, budget_ms, args.seed)
                except Exception as e:  # keep what was measured so far
                    c = {"n": n, "backend": backend, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            res["sdpa_fwd_bwd"].append(c)
            save()
            if "median_ms" in c:
                print(f"  {backend} SDPA fwd+bwd causal GQA n={n}: {c['median_ms']:.3f} ms, {c['tflops']:.0f} TFLOP/s "
                      f"({c['runs']} runs), check {'pass' if c['check_pass'] else 'FAIL'} "
                      f"(worst rel L2 {max(c['check_rel_l2'].values()):.2e})", flush=True)
            else:
                print(f"  {backend} SDPA fwd+bwd n={n}: {c.get('error') or c.get('skipped')}", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
