#!/usr/bin/env bash
# The tiny route comparison on the CPU: trains the `tiny` model twice on the same data and steps,
# once with dense attention and once with MSA-PT (indexer warm-up, then top-k sparse attention),
# the two runs side by side on one thread each, then prints `msa eval`'s table (validation loss,
# retrieval accuracy, block and score recall per layer), checks that MSA-PT's validation loss is
# within 3% of dense and that the KL fell during the warm-up, and draws the curves and a
# selection heat-map. About 6-8 minutes on 2 free cores.
#
# Usage: bash scripts/compare.sh
# Needs a build with the trainer: bash scripts/setup_torch.sh && bash scripts/setup.sh
# Environment: MSA_BUILD_DIR (default build), MSA_COMPARE_OUT (default runs/compare),
#              MSA_COMPARE_STEPS (default 150), MSA_COMPARE_WARMUP_STEPS (default 15)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
msa=${MSA_BUILD_DIR:-build}/bin/msa
out=${MSA_COMPARE_OUT:-runs/compare}
steps=${MSA_COMPARE_STEPS:-150}
warm_steps=${MSA_COMPARE_WARMUP_STEPS:-15}
seq_len=1024  # the tiny config's; warm-up is counted in tokens

say() { printf '==> compare: %s\n' "$*"; }
die() { printf 'compare: error: %s\n' "$*" >&2; exit 1; }

[[ -x $msa ]] || die "$msa not found: build first (bash scripts/setup_torch.sh && bash scripts/setup.sh)"
if ! "$msa" train --help >/dev/null 2>&1; then
  die "$msa has no trainer: install torch (bash scripts/setup_torch.sh) and rebuild (bash scripts/setup.sh)"
fi

mkdir -p "$out"
# Threads that sleep rather than spin while waiting: on a shared or busy machine spinning OpenMP
# threads make the two-thread evaluation several times slower.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
common=(--config tiny --steps "$steps" --threads 1 --quiet)
say "training tiny dense and tiny msa-pt, $steps steps of $seq_len tokens each (warm-up $warm_steps steps), in parallel"
start=$SECONDS
"$msa" train "${common[@]}" --route dense --out "$out/dense" >"$out/dense.log" 2>&1 &
dense_pid=$!
"$msa" train "${common[@]}" --route msa-pt --warmup-tokens $((warm_steps * seq_len)) --log-every 5 \
  --out "$out/msa-pt" >"$out/msa-pt.log" 2>&1 &
pt_pid=$!
dense_rc=0 pt_rc=0
wait $dense_pid || dense_rc=$?
wait $pt_pid || pt_rc=$?
((dense_rc == 0)) || { cat "$out/dense.log"; die "dense training failed"; }
((pt_rc == 0)) || { cat "$out/msa-pt.log"; die "msa-pt training failed"; }
say "trained in $((SECONDS - start)) s"
grep -h '^validation' "$out/dense.log" "$out/msa-pt.log" | sed 's/^/    /'

say "evaluating both checkpoints"
"$msa" eval "$out/dense/final.ckpt" "$out/msa-pt/final.ckpt" --threads 2 --tasks niah_single,mqar \
  --depths 0,0.5,1 --cases 2 --json "$out/eval.json" | tee "$out/eval.txt"

"$msa" viz curves "$out/msa-pt/metrics.jsonl" --out "$out/msa-pt-curves.png" 2>/dev/null || true
"$msa" viz curves "$out/dense/metrics.jsonl" --out "$out/dense-curves.png" 2>/dev/null || true
"$msa" viz heatmap "$out/msa-pt/final.ckpt" --out "$out/msa-pt-heatmap.png" 2>/dev/null || true

# The claims: validation loss within 3% of dense; KL lower at the end of the warm-up than at its start.
awk -v out="$out" '
  BEGIN { n = 0 }
  FILENAME ~ /eval.json$/ {
    while (match($0, /"val_loss": [0-9.eE+-]+/)) {
      v[n++] = substr($0, RSTART + 12, RLENGTH - 12); $0 = substr($0, RSTART + RLENGTH)
    }
  }
  FILENAME ~ /metrics.jsonl$/ && /"phase": "warmup"/ && match($0, /"kl": [0-9.eE+-]+/) {
    k = substr($0, RSTART + 6, RLENGTH - 6); if (first == "") first = k; last = k
  }
  END {
    ok = 1
    ratio = v[1] / v[0]
    printf "==> compare: val loss dense %.4f, msa-pt %.4f: ratio %.4f (%s 1.03)\n", v[0], v[1], ratio, ratio <= 1.03 ? "<=" : ">"
    if (ratio > 1.03) ok = 0
    printf "==> compare: KL during warm-up %.4f -> %.4f (%s)\n", first, last, last < first ? "fell" : "did not fall"
    if (!(last < first)) ok = 0
    printf "==> compare: %s; outputs in %s\n", ok ? "PASS" : "FAIL", out
    exit ok ? 0 : 1
  }' "$out/eval.json" "$out/msa-pt/metrics.jsonl"
