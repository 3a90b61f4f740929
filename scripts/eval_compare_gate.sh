#!/usr/bin/env bash
# Evaluates `handoff ab` as a CI gate on real runtimes (ONNX Runtime and
# tract, generated encoders) on this machine. N runs of each:
#   aa-p50   base = head = one 20-layer encoder file   -> runs with a false
#            `regressed` (target <= 1 of 20)
#   slow-p50 head has 21 layers (5% more FLOPs)         -> runs where every
#            case is `regressed` on p50 (target >= 19 of 20)
#   aa-p99   as aa-p50, gated on p99                    -> false regressions
#   slow-p99 head has 22 layers (10% more FLOPs), p99   -> detections
# (a tail gate leaves out the rounds in which either side met a host stall,
# while they are at most a fifth of the rounds)
# The FLOPs of the three files (tract's cost model) are printed.
#
#   scripts/eval_compare_gate.sh [N=20] [OUT=reports/eval-gate-<time>]
#   REGATE=1 scripts/eval_compare_gate.sh N OUT   # gate OUT's runs again
#
# P99_RUNS=K runs the two p99 sets K times instead of N, P50_RUNS=K the
# p50 sets. The p99 runs are then gated again on p95 and p90 (`handoff ab
# --gate-only`: the same samples, nothing measured again) as the sets
# aa-p95, slow-p95, aa-p90 and slow-p90, and on p99 with the rounds that
# met a host stall kept (`--keep-stalls`) as aa-p99k and slow-p99k.
# HANDOFF_BIN picks the binary (default target/release/handoff, built if
# missing). A run directory that is complete is not measured again, so an
# interrupted evaluation continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
out=$(realpath -m "${2:-reports/eval-gate-$(date -u +%Y%m%dT%H%M%S)}")
bin=$(realpath -m "${HANDOFF_BIN:-target/release/handoff}")
. scripts/eval_common.sh
eval_prepare "$out"
mkdir -p "$out/models"

# The three encoder files, written by preparing a suite that lists them.
cat > "$out/models.yaml" <<'YAML'
name: gate-eval-models
models:
  - {id: d20, source: {synthetic: {kind: encoder, width: 128, depth: 20, seed: 1}}}
  - {id: d21, source: {synthetic: {kind: encoder, width: 128, depth: 21, seed: 1}}}
  - {id: d22, source: {synthetic: {kind: encoder, width: 128, depth: 22, seed: 1}}}
backends: [ort]
dims: {seq: [32]}
YAML
HANDOFF_MODEL_CACHE="$out/models" "$bin" prepare "$out/models.yaml" >/dev/null
for d in 20 21 22; do
  cp "$out/models/synthetic/encoder-w128-d$d-s1.onnx" "$out/d$d.onnx"
done

# What a team would gate: the deployed configurations (here one thread,
# batch 1, on both runtimes), at most 12 s per case: about 115 rounds of
# 100 ms blocks (4 s gave ±5% intervals, too wide to find 5%).
cat > "$out/gate.yaml" <<'YAML'
name: gate-eval
models:
  - {id: enc, source: {onnx: d20.onnx}}
backends: [ort, tract]
threads: [1]
batch: [1]
dims: {seq: [32]}
measure: {warmup: 300ms, min_iterations: 10, min_time: 1s, max_time: 12s, target_ci: 0.01, rounds: 60, processes: 3}
check: {reference: ort, atol: 1e-3, rtol: 1e-3}
timeout: 60s
YAML

head_of() { # the head file of a measured set
  case "$1" in aa-*) echo d20.onnx ;; slow-p50) echo d21.onnx ;; *) echo d22.onnx ;; esac
}

gate_again() { # $1 = measured run, $2 = head file, $3 = JSON out, $4... = flags
  local run=$1 head=$2 json=$3 code=0
  shift 3
  (cd "$out" && "$bin" ab gate.yaml --model enc --base d20.onnx --head "$head" \
    --out "$run" --gate-only "$@" --json "$json" >/dev/null) || code=$?
  if [ "$code" -gt 1 ]; then
    echo "handoff ab --gate-only exited $code" >&2
    exit "$code"
  fi
}

ab() { # $1 = name, $2 = head file, $3 = metric, $4 = run number
  local dir="$out/$1-$4"
  if [ -s "$dir/ab.json" ]; then return; fi
  rm -rf "$dir"
  echo "$1 $4" >&2
  local code=0
  (cd "$out" && "$bin" ab gate.yaml --model enc --base d20.onnx --head "$2" \
    --metric "$3" --out "$dir" --quiet --json "$dir.json.tmp" >/dev/null) || code=$?
  if [ "$code" -gt 1 ]; then
    echo "handoff ab exited $code" >&2
    exit "$code"
  fi
  mv "$dir.json.tmp" "$dir/ab.json"
}
k=${P99_RUNS:-$n}
k50=${P50_RUNS:-$n}
if [ -n "${REGATE:-}" ]; then
  # Gate every stored run again with $bin (after a change to the gate),
  # measuring nothing; the sets derived from the p99 runs follow below.
  for run in "$out"/aa-p50-* "$out"/slow-p50-* "$out"/aa-p99-* "$out"/slow-p99-*; do
    [ -s "$run/ab.json" ] || continue
    name=$(basename "$run") && name=${name%-*}
    gate_again "$run" "$(head_of "$name")" "$run/ab.json.tmp" --metric "${name#*-}"
    mv "$run/ab.json.tmp" "$run/ab.json"
  done
  rm -rf "$out"/aa-p9[05]-* "$out"/slow-p9[05]-* "$out"/aa-p99[sk]-* "$out"/slow-p99[sk]-*
fi
# REGATE measures nothing: a set with fewer stored runs stays as it is.
if [ -z "${REGATE:-}" ]; then
  for i in $(seq 1 "$n"); do
    if [ "$i" -le "$k50" ]; then
      for name in aa-p50 slow-p50; do ab "$name" "$(head_of "$name")" p50 "$i"; done
    fi
    if [ "$i" -le "$k" ]; then
      for name in aa-p99 slow-p99; do ab "$name" "$(head_of "$name")" p99 "$i"; done
    fi
  done
fi
for i in $(seq 1 "$k"); do
  for side in aa slow; do
    # p99k: p99 again with the stalled rounds kept, to show what leaving
    # them out changes.
    for metric in p95 p90 p99k; do
      run="$out/$side-p99-$i" dir="$out/$side-$metric-$i"
      if [ ! -s "$run/ab.json" ] || [ -s "$dir/ab.json" ]; then continue; fi
      mkdir -p "$dir"
      flags=(--metric "${metric%k}")
      if [ "$metric" = p99k ]; then flags+=(--keep-stalls); fi
      gate_again "$run" "$(head_of "$side-p99")" "$dir/ab.json" "${flags[@]}"
    done
  done
done
python3 scripts/eval_compare_gate.py "$out" "$n"
