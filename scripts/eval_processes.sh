#!/usr/bin/env bash
# Compares worker processes per case side by side: the two-thread cases of
# suites/aa.yaml, measured with P1 and with P2 processes per case in
# alternating runs (P1, P2, P1, P2, ...), so a noisy stretch of the machine
# hits both settings alike. Prints, per pair and setting, how often the A/A
# pair said "no measurable difference", how often the planted 5% was found,
# and the half-widths.
#
#   scripts/eval_processes.sh [RUNS=5] [P1=5] [P2=16] [OUT=reports/eval-processes-<time>]
#
# HANDOFF_BIN picks the binary (default target/release/handoff, built if
# missing). A finished run is not measured again.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-5}
p1=${2:-5}
p2=${3:-16}
out=$(realpath -m "${4:-reports/eval-processes-$(date -u +%Y%m%dT%H%M%S)}")
bin=$(realpath -m "${HANDOFF_BIN:-target/release/handoff}")
. scripts/eval_common.sh
eval_prepare "$out"
for p in "$p1" "$p2"; do
  sed -e 's/^threads: \[1, 2\]/threads: [2]/' \
    -e "s/processes: [0-9]*,/processes: $p,/" \
    -e "s/^name: aa/name: aa-t2-p$p/" suites/aa.yaml > "$out/aa-p$p.yaml"
  grep -q "processes: $p," "$out/aa-p$p.yaml"
  grep -q "^threads: \[2\]" "$out/aa-p$p.yaml"
done
for i in $(seq 1 "$n"); do
  for p in "$p1" "$p2"; do
    dir="$out/p$p-$i"
    if [ -s "$dir/summary.md" ]; then continue; fi
    rm -rf "$dir"
    echo "processes $p, run $i/$n" >&2
    "$bin" run "$out/aa-p$p.yaml" --quiet --seed "$((100 + i))" --out "$dir"
  done
done
python3 - "$out" "$p1" "$p2" <<'PY'
import collections, glob, json, math, statistics as st, sys
out, settings = sys.argv[1], sys.argv[2:]
rows = collections.defaultdict(list)
for p in settings:
    for d in sorted(glob.glob(f"{out}/p{p}-*")):
        for line in open(f"{d}/comparisons.jsonl"):
            c = json.loads(line)
            if c.get("kind") != "model" or not c["a"].startswith("enc-a/"):
                continue
            cfg = "/".join(c["a"].split("/")[1:5])
            rows[(cfg, c["b"].split("/")[0], int(p))].append(c)
print(open(f"{out}/cpu.txt").read().strip())
print("| pair | backend | batch | processes | runs | as expected | median half-width | range | ratios |")
print("|---|---|---:|---:|---:|---:|---:|---|---|")
for (cfg, b, p), cs in sorted(rows.items()):
    backend, _, _, batch = cfg.split("/")
    want = "no measurable difference" if b == "enc-a2" else "slower"
    hw = [100 * (c["ci95"][1] - c["ci95"][0]) / 2 for c in cs]
    ratios = ", ".join("%.3f" % c["ratio"] for c in cs)
    print(f"| {b} / enc-a | {backend} | {batch[1:]} | {p} | {len(cs)} | "
          f"{sum(c['verdict'] == want for c in cs)}/{len(cs)} | ±{st.median(hw):.1f}% | "
          f"±{min(hw):.1f}-{max(hw):.1f}% | {ratios} |")
PY
