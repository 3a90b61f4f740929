#!/usr/bin/env bash
# Evaluates `handoff compare` as a CI gate on this machine:
#   20 A/A comparisons of a small suite        -> at most 1 false `regressed`
#   20 comparisons with +10% on one case (b)    -> b `regressed` in >= 19,
#                                                  no other case flagged
# The suite uses the mock backend's spin-wait latency with a `slowdown`
# knob, in child processes as a real run does.
#   scripts/eval_compare_gate.sh [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
bin=${HANDOFF:-target/release/handoff}
[ -x "$bin" ] || cargo build --release -p handoff-cli
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
suite() { # $1 = slowdown of model b
  cat <<YAML
name: gate-eval
models:
  - {id: a, source: {synthetic: {kind: mlp, width: 8, depth: 1, seed: 1}}}
  - {id: b, source: {synthetic: {kind: mlp, width: 8, depth: 1, seed: 2}}}
  - {id: c, source: {synthetic: {kind: mlp, width: 8, depth: 1, seed: 3}}}
  - {id: d, source: {synthetic: {kind: mlp, width: 8, depth: 1, seed: 4}}}
backends: [mock]
check: {reference: mock}
backend_options: {mock: {latency_us: 500, slowdown: $1, slowdown_model: b}}
measure: {warmup: 100ms, min_iterations: 50, min_time: 300ms, max_time: 1s, target_ci: 0.005}
YAML
}
suite 1.0 > "$work/base.yaml"
suite 1.1 > "$work/slow.yaml"
aa_false=0; slow_hit=0; slow_other=0
for i in $(seq 1 "$n"); do
  "$bin" run "$work/base.yaml" --out "$work/x$i" --quiet
  "$bin" run "$work/base.yaml" --out "$work/y$i" --quiet
  "$bin" run "$work/slow.yaml" --out "$work/z$i" --quiet
  aa=$("$bin" compare "$work/x$i" "$work/y$i" --json - || true)
  sl=$("$bin" compare "$work/x$i" "$work/z$i" --json - || true)
  c=$(python3 -c 'import json,sys; print(sum(r["verdict"]=="regressed" for r in json.load(sys.stdin)["rows"]))' <<<"$aa")
  b=$(python3 -c 'import json,sys; print(sum(r["verdict"]=="regressed" and r["id"].startswith("b/") for r in json.load(sys.stdin)["rows"]))' <<<"$sl")
  o=$(python3 -c 'import json,sys; print(sum(r["verdict"] in ("regressed","improved") and not r["id"].startswith("b/") for r in json.load(sys.stdin)["rows"]))' <<<"$sl")
  aa_false=$((aa_false + (c > 0 ? 1 : 0))); slow_hit=$((slow_hit + b)); slow_other=$((slow_other + o))
  echo "round $i: A/A regressed cases $c; +10% on b: b regressed $b, others flagged $o"
done
echo "A/A comparisons with a false regression: $aa_false/$n (target <= 1)"
echo "+10% slowdown detected on b: $slow_hit/$n (target >= $((n - 1))); other cases flagged: $slow_other"
[ "$aa_false" -le 1 ] && [ "$slow_hit" -ge $((n - 1)) ] && [ "$slow_other" -eq 0 ]
