#!/usr/bin/env bash
# scripts/quality_study.sh — the small-scale quality study of docs/results/quality.md: a dense GQA
# baseline (two initialisation seeds), MSA-PT and MSA-CPT trained on the same data order, steps and
# hyper-parameters with `msa train`, then compared with `msa eval` and pictured with `msa viz`.
#
# Usage: bash scripts/quality_study.sh PHASE...   (phases run in the order given)
#   probe        throughput of dense (30 steps) and msa-pt (50 steps, 20 of warm-up), and the wall
#                time of one full `msa eval` (on the msa-pt probe checkpoint): what sizes STEPS
#   dense1       dense, seed 1, STEPS steps
#   pt           msa-pt, seed 1: warm-up for PT_WARM_PCT % of the steps, then sparse
#   dense2       dense, initialisation seed 2, data seed 1 (same data order): the seed spread;
#                keeps its checkpoint at 80 % of the steps for cpt
#   dense3       dense, initialisation seed 3, data seed 1: a third point of the seed spread
#   cpt          msa-cpt from dense2's 80 % checkpoint, continuing its run (--continue-schedule:
#                same step, LR schedule, data position and LM AdamW state; fresh index):
#                warm-up for CPT_WARM_PCT % of the steps, then sparse up to STEPS
#   eval-ARM     msa eval of ARM's final checkpoint (ARM = dense1, dense2, dense3, pt, cpt):
#                RUNS/eval-ARM.{json,txt}
#   viz-ARM      selection heat-maps of an early and a late MSA layer of ARM (pt or cpt):
#                RUNS/heat-ARM-L<layer>.png (text sample, KV head 0)
#   curves       loss curves of every arm present: RUNS/curves-ARM.png
# Environment (default): MSA (build/bin/msa), CORPUS (data/corpus: scripts/prepare_corpus.sh),
#   RUNS (runs/quality), DEVICE (cuda), CONFIG (gpu-40m-16k), STEPS (2000), RF (0.05: share of
#   retrieval documents in the training mix), PT_WARM_PCT (4), CPT_WARM_PCT (5), EVAL_CASES (4:
#   retrieval cases per task, context and depth), EVAL_CONTEXTS (4096,8192,16384,32768),
#   LAYERS_VIZ ("2 11").
# Every phase prints its wall time ("== PHASE done in S s"); `msa train` writes RUNS/ARM/metrics.jsonl.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MSA=${MSA:-$root/build/bin/msa}
CORPUS=${CORPUS:-$root/data/corpus}
RUNS=${RUNS:-$root/runs/quality}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-gpu-40m-16k}
STEPS=${STEPS:-2000}
RF=${RF:-0.05}
PT_WARM_PCT=${PT_WARM_PCT:-4}
CPT_WARM_PCT=${CPT_WARM_PCT:-5}
EVAL_CASES=${EVAL_CASES:-4}
EVAL_CONTEXTS=${EVAL_CONTEXTS:-4096,8192,16384,32768}
LAYERS_VIZ=${LAYERS_VIZ:-"2 11"}
SEQ=${SEQ:-16384}

((STEPS % 10 == 0)) || { echo "quality_study: STEPS must be a multiple of 10 (80 % checkpoint)" >&2; exit 2; }
mkdir -p "$RUNS"
common=(--config "$CONFIG" --device "$DEVICE" --corpus "$CORPUS" --retrieval-fraction "$RF" --seq-len "$SEQ"
        --log-every 10)
cpt_from=$((STEPS * 8 / 10))

train() {  # train ARM [options]
  local arm=$1
  shift
  "$MSA" train "${common[@]}" --out "$RUNS/$arm" "$@"
}

evaluate() {  # evaluate ARM
  local arm=$1
  "$MSA" eval "$RUNS/$arm/final.ckpt" --device "$DEVICE" --corpus "$CORPUS" --valid-samples 16 \
    --contexts "$EVAL_CONTEXTS" --depths 0.1,0.3,0.5,0.7,0.9 --tasks niah_single,niah_multikey,mqar \
    --cases "$EVAL_CASES" --json "$RUNS/eval-$arm.json" | tee "$RUNS/eval-$arm.txt"
}

phase() {
  local p=$1 t0=$SECONDS
  echo "== $p (STEPS $STEPS)"
  case "$p" in
    probe)
      train probe-dense --route dense --steps 30 --eval-every 0 --valid-samples 0
      train probe-pt --route msa-pt --steps 50 --warmup-tokens $((20 * SEQ)) --eval-every 0 --valid-samples 0
      local e0=$SECONDS
      "$MSA" eval "$RUNS/probe-pt/final.ckpt" --device "$DEVICE" --corpus "$CORPUS" --valid-samples 16 \
        --contexts "$EVAL_CONTEXTS" --depths 0.1,0.3,0.5,0.7,0.9 --tasks niah_single,niah_multikey,mqar \
        --cases "$EVAL_CASES" --json "$RUNS/eval-probe-pt.json" >"$RUNS/eval-probe-pt.txt"
      echo "eval_seconds $((SECONDS - e0))" | tee "$RUNS/probe-eval-seconds.txt"
      ;;
    dense1) train dense1 --route dense --seed 1 --steps "$STEPS" --eval-every $((STEPS / 10)) --valid-samples 4 ;;
    dense2)
      train dense2 --route dense --seed 2 --data-seed 1 --steps "$STEPS" --eval-every $((STEPS / 10)) --valid-samples 4 \
        --save-every "$cpt_from"
      ;;
    dense3) train dense3 --route dense --seed 3 --data-seed 1 --steps "$STEPS" --eval-every $((STEPS / 10)) --valid-samples 4 ;;
    pt)
      train pt --route msa-pt --seed 1 --steps "$STEPS" --eval-every $((STEPS / 10)) --valid-samples 4 \
        --warmup-tokens $((STEPS * PT_WARM_PCT / 100 * SEQ))
      ;;
    cpt)
      train cpt --route msa-cpt --init "$RUNS/dense2/step-$cpt_from.ckpt" --continue-schedule --seed 2 \
        --steps "$STEPS" --eval-every $((STEPS / 10)) --valid-samples 4 --warmup-tokens $((STEPS * CPT_WARM_PCT / 100 * SEQ))
      ;;
    eval-*) evaluate "${p#eval-}" ;;
    viz-*)
      local arm=${p#viz-}
      for l in $LAYERS_VIZ; do
        "$MSA" viz heatmap "$RUNS/$arm/final.ckpt" --device "$DEVICE" --corpus "$CORPUS" --layer "$l" \
          --out "$RUNS/heat-$arm-L$l.png"
      done
      ;;
    curves)
      for arm in dense1 dense2 dense3 pt cpt; do
        [[ -f $RUNS/$arm/metrics.jsonl ]] || continue
        "$MSA" viz curves "$RUNS/$arm/metrics.jsonl" --keys lm_loss,val_loss,kl --out "$RUNS/curves-$arm.png"
      done
      ;;
    *) echo "quality_study: unknown phase $p (see the header of this script)" >&2; exit 2 ;;
  esac
  echo "== $p done in $((SECONDS - t0)) s"
}

(($#)) || { sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }
for p in "$@"; do phase "$p"; done
