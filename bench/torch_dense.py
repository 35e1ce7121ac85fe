"""Times PyTorch SDPA on the shapes of bench_dense, as the baseline for msa's CUDA dense forward.

torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) on random normal bf16
[1, h, n, d] tensors, restricted to one backend at a time with torch.nn.attention.sdpa_kernel
(cuDNN, then flash). GQA goes through enable_gqa=True where the backend takes it, otherwise K and V
are expanded to h_q heads with repeat_interleave before timing. CUDA events around each call,
warm-up first, median of the timed runs. Cost model as bench_dense: 4 * h_q * d * n (n + 1) / 2.

    python3 bench/torch_dense.py [--n 8192,32768] [--iters 10]
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, stop in events:
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(stop) for start, stop in events)


def run(n, h_q, h_kv, d, iters):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(n + h_q + d)
    q = torch.randn(1, h_q, n, d, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, h_kv, n, d, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, h_kv, n, d, device=dev, dtype=torch.bfloat16, generator=g)
    flops = 4.0 * h_q * d * n * (n + 1) / 2
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        how, ms = "-", None
        with sdpa_kernel(backend):
            try:
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 2, iters)
                how = "enable_gqa"
            except RuntimeError:
                try:
                    rep = h_q // h_kv
                    ke, ve = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                    ms = time_ms(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True), 2, iters)
                    how = "repeat_interleave"
                    del ke, ve
                except RuntimeError as e:
                    how = "unavailable: " + str(e).splitlines()[0][:60]
        if ms is None:
            print(f"| {n:6d} | {h_q:4d} | {h_kv:4d} | {d:3d} | {name:<8} | - | - | {how} |", flush=True)
        else:
            print(f"| {n:6d} | {h_q:4d} | {h_kv:4d} | {d:3d} | {name:<8} | {ms:9.3f} | {flops / (ms * 1e-3) / 1e12:7.1f} | {how} |",
                  flush=True)
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="8192,32768")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    ns = sorted(int(x) for x in args.n.split(","))
    print(f"torch_dense: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"causal, one sequence, bf16; median of {args.iters} runs after 2 warm-ups")
    print("| n | h_q | h_kv | d | backend | ms | TFLOP/s | GQA |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in ns:
        run(n, 64, 4, 128, args.iters)
    run(ns[-1], 64, 4, 64, args.iters)
    run(ns[0], 16, 16, 128, args.iters)


if __name__ == "__main__":
    main()
