#!/usr/bin/env bash
# Evaluates handoff's interleaved comparisons on this machine: runs a suite
# N times and counts, per pair of the two model ids (same backend, threads,
# batch), how often the paired ratio's 95% CI covers 1.0, its verdicts and
# half-widths, and whether the two cases' own CIs overlap.
#
#   scripts/eval_aa.sh [N=20] [SUITE=suites/aa.yaml] [OUT=reports/eval-aa-<time>]
#
# suites/aa.yaml holds one file under two ids (false positives) and a copy
# with 5% more work (detection, checked by FLOPs). HANDOFF_BIN picks the
# binary (default: target/release/handoff, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
suite=${2:-suites/aa.yaml}
out=${3:-reports/eval-$(basename "$suite" .yaml)-$(date -u +%Y%m%dT%H%M%S)}
bin=${HANDOFF_BIN:-target/release/handoff}
. scripts/eval_common.sh
eval_prepare "$out"
for i in $(seq 1 "$n"); do
  if [ -s "$out/run-$i/results.jsonl" ] && [ -s "$out/run-$i/summary.md" ]; then
    continue
  fi
  rm -rf "$out/run-$i"
  echo "run $i/$n" >&2
  # A different seed per run: each run is an independent draw of the
  # start and round orders (and the inputs).
  "$bin" run "$suite" --quiet --seed "$i" --out "$out/run-$i"
done
python3 scripts/eval_aa.py "$out" "$n"
