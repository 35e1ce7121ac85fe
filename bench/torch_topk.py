"""Times torch.topk on the block top-k benchmark shape, as the baseline for bench_topk.

torch.topk(x, k, dim=1, sorted=False) on random normal [rows, n_blocks] fp32 and bf16, timed the
way bench_topk times msa::block_topk: CUDA events around each call, queued back to back, warm-up
first, median of many runs, input sets rotated so that no run starts with its input in L2.

    python3 bench/torch_topk.py [--rows 131072] [--n-blocks 1024] [--k 16] [--iters 100] [--json FILE]
"""

import argparse
import json
import statistics

import torch


def time_topk(xs, k, warmup, iters):
    for i in range(warmup):
        torch.topk(xs[i % len(xs)], k, dim=1, sorted=False)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, stop) in enumerate(events):
        start.record()
        torch.topk(xs[i % len(xs)], k, dim=1, sorted=False)
        stop.record()
    torch.cuda.synchronize()
    ms = [start.elapsed_time(stop) for start, stop in events]
    return statistics.median(ms), min(ms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--n-blocks", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"device: {props.name}, torch {torch.__version__}")
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device=dev).manual_seed(1234)
        n_bytes = args.rows * args.n_blocks * torch.tensor([], dtype=dtype).element_size()
        n_sets = max(2, (200 << 20) // n_bytes + 1)
        xs = [torch.randn(args.rows, args.n_blocks, device=dev, dtype=torch.float32, generator=gen).to(dtype)
              for _ in range(n_sets)]
        med, mn = time_topk(xs, args.k, warmup=5, iters=args.iters)
        gbps = (n_bytes + args.rows * args.k * 12) / med * 1e-6  # input read, values + int64 indices written
        name = f"torch.topk {str(dtype).replace('torch.', '')} [{args.rows}x{args.n_blocks}] k={args.k} sorted=False"
        print(f"{name:60s} median {med:8.4f} ms  min {mn:8.4f} ms  {gbps:7.1f} GB/s")
        results.append({"name": name, "dtype": str(dtype).replace("torch.", ""), "rows": args.rows,
                        "n_blocks": args.n_blocks, "topk": args.k, "median_ms": round(med, 5), "min_ms": round(mn, 5),
                        "gbps": round(gbps, 1)})
        del xs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "iters": args.iters, "cases": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
