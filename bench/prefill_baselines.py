"""PyTorch baselines for `msa bench prefill`, measured on the same GPU in the same session.

- Dense causal attention with GQA through PyTorch SDPA on the cuDNN backend:
  scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) on random normal bf16
  [1, h, n, d] tensors at the M3 shape (h_q = 64, h_kv = 4, d = 128). FLOPs: the exact causal
  count 4 * h_q * d * n (n + 1) / 2, as msa's dense row. The last query's output of two heads is
  checked against a float32 recomputation (a wrong or truncated long-sequence path shows there).
- torch.topk(x, 16, dim=1, sorted=False) on [131072 x 1024] fp32 and bf16, two input sets in turn.

Timing as msa bench: CUDA events around each call, queued back to back; the first call warms up
and sizes the repetitions (up to --iters within ~--budget-s seconds, median reported); a call
longer than the budget is measured once, by that first call (runs = 1, separate_warmup = false).
The JSON is rewritten after every measurement, so a failure at a large size keeps the rest.

    python3 bench/prefill_baselines.py --n 8192,32768,131072,524288,1048576 --json baselines.json
"""

import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H_Q, H_KV, D = 64, 4, 128


def time_calls(fn, iters, budget_ms):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(stop)
    if first >= budget_ms:
        return {"median_ms": first, "min_ms": first, "runs": 1, "separate_warmup": False}
    reps = max(1, min(iters, int(budget_ms / max(first, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in events]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "runs": reps, "separate_warmup": True}


def driver_version():
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception as e:  # the driver version is informative only
        return f"unknown ({type(e).__name__})"


def sdpa_case(n, iters, budget_ms, seed):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed + n)
    q = torch.randn(1, H_Q, n, D, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, H_KV, n, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, H_KV, n, D, device=dev, dtype=torch.bfloat16, generator=gen)
    flops = 4.0 * H_Q * D * n * (n + 1) / 2
    case = {"n": n, "backend": "cudnn", "gqa": "enable_gqa", "flops": flops}
    out = {}

    kv = {"k": k, "v": v, "gqa": True}

    def call():
        out.pop("o", None)  # at 1M one output is 16 GiB: never hold two
        if kv["gqa"]:
            out["o"] = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out["o"] = F.scaled_dot_product_attention(q, kv["k"], kv["v"], is_causal=True)

    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            t = time_calls(call, iters, budget_ms)
    except RuntimeError as e:
        # A cuDNN build without GQA support: expand K and V to h_q heads before timing (the
        # expansion is not timed), if they fit.
        case["gqa_error"] = str(e).splitlines()[0][:200]
        out.pop("o", None)
        free, _ = torch.cuda.mem_get_info()
        if 2 * 2 * H_Q * n * D * 1.1 + 2 * H_Q * n * D > free:
            case["error"] = "enable_gqa unsupported and expanded K/V do not fit: " + case["gqa_error"]
            return case
        kv.update(k=k.repeat_interleave(H_Q // H_KV, dim=1), v=v.repeat_interleave(H_Q // H_KV, dim=1), gqa=False)
        case["gqa"] = "repeat_interleave (K/V expanded to h_q heads before timing)"
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t = time_calls(call, iters, budget_ms)
        except RuntimeError as e2:
            case["error"] = str(e2).splitlines()[0][:200]
            return case
    case.update(t)
    case["tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
    # The last query sees every key: recompute two of its heads (groups 0 and 3) in float32.
    o = out["o"]
    worst = 0.0
    for h in (0, H_Q - 1):
        r = h // (H_Q // H_KV)
        qi = q[0, h, n - 1].float()
        s = (k[0, r].float() @ qi) / math.sqrt(D)
        p = torch.softmax(s, dim=0)
        ref = p @ v[0, r].float()
        got = o[0, h, n - 1].float()
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    case["check_last_query_rel_l2"] = worst
    case["check_pass"] = bool(worst < 2e-2 and torch.isfinite(o[0, :, n - 1]).all().item())
    return case


def topk_case(dtype, iters, budget_ms):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1234)
    rows, n_blocks, k = 131072, 1024, 16
    xs = [torch.randn(rows, n_blocks, device=dev, dtype=torch.float32, generator=gen).to(dtype) for _ in range(2)]
    turn = [0]

    def call():
        torch.topk(xs[turn[0] % 2], k, dim=1, sorted=False)
        turn[0] += 1

    t = time_calls(call, max(iters, 20), budget_ms)
    name = str(dtype).replace("torch.", "")
    n_bytes = rows * n_blocks * xs[0].element_size()
    case = {"name": f"torch.topk {name} [{rows}x{n_blocks}] k={k} sorted=False", "dtype": name, **t,
            "gbps": (n_bytes + rows * k * 12) / (t["median_ms"] * 1e-3) / 1e9}
    del xs
    torch.cuda.empty_cache()
    return case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="8192,32768,131072,524288,1048576")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    budget_ms = args.budget_s * 1e3
    props = torch.cuda.get_device_properties(0)
    res = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "driver": driver_version(),
           "command": "python3 bench/prefill_baselines.py " + " ".join(sys.argv[1:]),
           "timing": f"CUDA events, first call warms up and sizes the runs: up to {args.iters} "
                     f"(topk: {max(args.iters, 20)}) within ~{args.budget_s:g} s, median",
           "sdpa": [], "topk": []}

    def save():
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)

    print(f"prefill_baselines: {props.name}, torch {torch.__version__}, cuDNN {res['cudnn']}, driver {res['driver']}",
          flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        c = topk_case(dtype, args.iters, budget_ms)
        res["topk"].append(c)
        save()
        print(f"  {c['name']}: {c['median_ms']:.4f} ms ({c['runs']} runs)", flush=True)
    for n in sorted(int(x) for x in args.n.split(",")):
        free, _ = torch.cuda.mem_get_info()
        need = 2 * (2 * H_Q + 2 * H_KV) * n * D + 4 * H_Q * n
        if need * 1.1 > free:
            c = {"n": n, "backend": "cudnn", "skipped": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
        else:
            try:
                c = sdpa_case(n, args.iters, budget_ms, args.seed)
            except Exception as e:  # keep what was measured so far
                c = {"n": n, "backend": "cudnn", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        res["sdpa"].append(c)
        save()
        if "median_ms" in c:
            print(f"  cuDNN SDPA causal GQA n={n}: {c['median_ms']:.3f} ms, {c['tflops']:.0f} TFLOP/s "
                  f"({c['runs']} runs), last-query check rel L2 {c['check_last_query_rel_l2']:.2e}", flush=True)
        else:
            print(f"  cuDNN SDPA n={n}: {c.get('error') or c.get('skipped')}", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
