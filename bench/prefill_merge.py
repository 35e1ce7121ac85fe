"""Folds the PyTorch baselines (bench/prefill_baselines.py) into the results of `msa bench prefill`:
one JSON with both (ours unchanged, theirs under "baselines", the side-by-side numbers under
"comparison") and one markdown report with ours and theirs in the same tables.

    python3 bench/prefill_merge.py --ours prefill.json --baselines baselines.json \
        --out docs/benchmarks/prefill-YYYY-MM-DD

"Fastest dense" is the faster of msa's dense forward and cuDNN SDPA at that length. The vLLM Triton
numbers are quoted from the project's kernel notes (measured earlier on an H100 of the same kind),
not measured by these scripts, and are labelled so.
"""

import argparse
import json
import sys

# From the project's kernel notes (H100 80GB HBM3, November 2026), not measured in this run.
TRITON_QUOTED = {
    "source": "quoted from the project's kernel notes, not measured in this run",
    "what": "the Triton MSA path vLLM runs on Hopper, M3 shape, one whole layer (index + top-k + sparse attention)",
    "layer_ms": {"8192": 4.4, "32768": 20.9, "131072": 111.7, "262144": 319.0},
    "split_131072": {"index_topk_ms": 27.6, "sparse_attention_ms": 84.1},
}


def fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 10 else f"{ms:.3f}"


def runs(t):
    if t is None or t.get("runs", 5) >= 5:
        return ""
    return f" ({t['runs']}{'' if t.get('separate_warmup', True) else '*'})"


def tf(t):
    return f"{t['tflops']:.0f}" if t and t.get("tflops") is not None else "-"


def n_label(n):
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--baselines", required=True)
    ap.add_argument("--out", required=True, help="prefix: writes OUT.json and OUT.md")
    args = ap.parse_args()
    ours = json.load(open(args.ours))
    theirs = json.load(open(args.baselines))
    cudnn = {c["n"]: c for c in theirs.get("sdpa", [])}

    comparison = []
    for z in ours["sizes"]:
        n = z["n"]
        c = cudnn.get(n, {})
        row = {"n": n}
        if "skipped" in z:
            row["skipped"] = z["skipped"]
            comparison.append(row)
            continue
        our_dense = z["dense"]["timing"]["median_ms"]
        cudnn_ms = c.get("median_ms")
        dense = [("msa dense", our_dense)] + ([("cuDNN SDPA", cudnn_ms)] if cudnn_ms else [])
        name, best = min(dense, key=lambda x: x[1])
        row.update({"our_dense_ms": our_dense, "cudnn_ms": cudnn_ms, "fastest_dense": name, "fastest_dense_ms": best,
                    "layer_path": z["layer_path"]})
        for s in z["selections"]:
            row[f"msa_layer_ms_{s['name']}"] = s["layer"]["median_ms"]
            row[f"msa_layer_speedup_vs_fastest_dense_{s['name']}"] = best / s["layer"]["median_ms"]
        comparison.append(row)
    merged = dict(ours)
    merged["baselines"] = theirs
    merged["comparison"] = comparison
    merged["triton_vllm_quoted"] = TRITON_QUOTED
    merged["merge_command"] = "python3 bench/prefill_merge.py " + " ".join(sys.argv[1:])
    with open(args.out + ".json", "w") as f:
        json.dump(merged, f, indent=2)
        f.write("\n")

    sh = ours["shape"]
    md = [f"# Prefill benchmark: one MSA layer on {ours['gpu']} — {ours['date']}", ""]
    md += [f"- GPU: {ours['gpu']} ({ours['sms']} SMs, {ours['gpu_memory_gib']:.1f} GiB), driver {theirs.get('driver')}, "
           f"CUDA runtime {ours['cuda_runtime']}; PyTorch {theirs.get('torch')}, cuDNN {theirs.get('cudnn')}.",
           f"- Commit: {ours['commit']} (msa {ours['msa_version']}). Both programs ran one after the other in the same "
           f"session on the same GPU.",
           f"- Commands: `{ours['command']}`; `{theirs.get('command')}`; `{merged['merge_command']}`.",
           f"- Shape: M3, h_q = {sh['h_q']}, h_kv = {sh['h_kv']}, d = d_idx = {sh['d']}, bk = {sh['bk']}, "
           f"topk = {sh['topk']}, bf16, one causal sequence of n tokens (batch 1).",
           f"- Timing: {ours['timing']['method']}. Run counts below 5 are shown in parentheses; * = a single call "
           f"that was also the first at that length.",
           "- FLOPs: index_topk = exact causal count 512 n (n + 1) (the 512 n^2 convention of docs/index_kernel.md); "
           "sparse = effective, 4 g d x (tokens attended, summed over (query, group) from the actual selection); "
           "dense (ours and cuDNN) = exact causal count 2 h_q d n (n + 1).",
           "- Inputs: random normal bf16 q, k, v (never zeros). Selection `random`: Gaussian index q/k, so "
           "index_topk picks near-random blocks. `planted`: a sink (block 0) and a local bias planted in the index "
           "q/k (tools/msa/bench_fill.h), so selections look like a trained indexer's.",
           f"- Layer rule: {ours['layer_rule']}.", ""]

    md += ["## One layer: MSA (index_topk + sparse forward) against dense attention", "",
           "| n | selection | index_topk ms | TFLOP/s | sparse fwd ms | eff. TFLOP/s | MSA layer ms | msa dense ms | "
           "TFLOP/s | cuDNN SDPA ms | TFLOP/s | layer path | MSA layer vs fastest dense |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for z, cmp in zip(ours["sizes"], comparison):
        n = z["n"]
        if "skipped" in z:
            md.append(f"| {n_label(n)} | skipped: {z['skipped']} | | | | | | | | | | | |")
            continue
        c = cudnn.get(n, {})
        cudnn_ms = c.get("median_ms")
        cudnn_cell = fmt_ms(cudnn_ms) + runs(c) if cudnn_ms else (c.get("error") or c.get("skipped") or "-")
        for s in z["selections"]:
            sp = cmp[f"msa_layer_speedup_vs_fastest_dense_{s['name']}"]
            md.append(f"| {n_label(n)} | {s['name']} | {fmt_ms(s['index_topk']['median_ms'])}{runs(s['index_topk'])} | "
                      f"{tf(s['index_topk'])} | {fmt_ms(s['sparse_forward']['median_ms'])}{runs(s['sparse_forward'])} | "
                      f"{tf(s['sparse_forward'])} | {fmt_ms(s['layer']['median_ms'])}{runs(s['layer'])} | "
                      f"{fmt_ms(z['dense']['timing']['median_ms'])}{runs(z['dense']['timing'])} | {tf(z['dense']['timing'])} | "
                      f"{cudnn_cell} | {tf(c) if cudnn_ms else '-'} | {z['layer_path']} | "
                      f"{sp:.2f}x ({cmp['fastest_dense']}) |")
    md += ["", "Layer path: " + "; ".join(f"{n_label(z['n'])}: {z['layer_path']} ({z['layer_why']})"
                                           for z in ours["sizes"] if "skipped" not in z) + ".", ""]

    md += ["## Selections and spot checks", "",
           "Tokens attended per (query, group) (at most topk x bk = 2048), how often the selection holds the sink "
           "(block 0) and the block before the query's own (over queries that see more than topk blocks), and the "
           "float64 spot checks: worst error over its bound (<= 1 passes; o: 2^-8 |o| + (2^-7 + 1e-4) o_abs, lse: "
           "1e-4 + 1e-6 |lse|) for all heads of 3 queries (sparse) and the 16 heads of group 0 of the last query "
           "(dense, every key); cuDNN: relative L2 error of two heads of the last query against float32.", "",
           "| n | selection | tokens / (query, group) | sink | previous block | sparse o, lse / bound | dense o, lse / "
           "bound | cuDNN rel. L2 |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for z in ours["sizes"]:
        if "skipped" in z:
            continue
        c = cudnn.get(z["n"], {})
        dc = z["dense"]["check"]
        crel = f"{c['check_last_query_rel_l2']:.1e}" if "check_last_query_rel_l2" in c else "-"
        for s in z["selections"]:
            ck = s["check"]
            md.append(f"| {n_label(z['n'])} | {s['name']} | {s['attended_tokens_per_query_group']:.0f} | "
                      f"{s['sink_fraction']:.2f} | {s['prev_block_fraction']:.2f} | "
                      f"{ck['o_worst_over_bound']:.2f}, {ck['lse_worst_over_bound']:.2f} ({'pass' if ck['pass'] else 'FAIL'}) | "
                      f"{dc['o_worst_over_bound']:.2f}, {dc['lse_worst_over_bound']:.2f} ({'pass' if dc['pass'] else 'FAIL'}) | "
                      f"{crel} |")
    md.append("")

    md += ["## block_topk against torch.topk: [131072 x 1024] scores, k = 16", "",
           "| | median ms | runs | effective GB/s | msa speed-up |", "| --- | --- | --- | --- | --- |"]
    bt = ours.get("block_topk")
    if bt:
        md.append(f"| msa::block_topk, fp32, force_last off | {bt['timing']['median_ms']:.4f} | {bt['timing']['runs']} | "
                  f"{bt['gbps']:.0f} | 1x |")
    for c in theirs.get("topk", []):
        sp = f"{c['median_ms'] / bt['timing']['median_ms']:.1f}x" if bt else "-"
        md.append(f"| {c['name']} | {c['median_ms']:.4f} | {c['runs']} | {c['gbps']:.0f} | {sp} |")
    md += ["", "Effective GB/s: scores read once plus the indices written (torch: values and int64 indices).", ""]

    md += ["## Not measured here: the vLLM Triton MSA path", "",
           "Quoted from the project's kernel notes, not measured in this run (H100 80GB HBM3, same shape, whole "
           "layer): " + ", ".join(f"{n_label(int(n))} {ms} ms" for n, ms in TRITON_QUOTED["layer_ms"].items()) +
           f"; at 128K index + top-k {TRITON_QUOTED['split_131072']['index_topk_ms']} ms and sparse attention "
           f"{TRITON_QUOTED['split_131072']['sparse_attention_ms']} ms.", ""]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
