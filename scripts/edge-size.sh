#!/usr/bin/env bash
# The edge story in one number: how big is a program that runs an ONNX
# model with tract alone, next to the full handoff binary (ort loader,
# tract, candle, plots, HTTP server)? Builds both in release, strips copies
# and prints their sizes; then runs the edge binary on the generated MLP.
#
#   scripts/edge-size.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p handoff-tract --example edge
cargo build --release --quiet -p handoff-cli
out=target/edge-size
mkdir -p "$out"
cp target/release/examples/edge "$out/edge"
cp target/release/handoff "$out/handoff"
strip "$out/edge" "$out/handoff"
mib() { awk -v b="$(stat -c %s "$1")" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "tract-only edge binary (stripped): $(mib "$out/edge")"
echo "full handoff binary (stripped):    $(mib "$out/handoff")"
model=models/cache/synthetic/mlp-w256-d2-s42.onnx
if [[ -f $model ]]; then
  "$out/edge" "$model" f32:1x256
fi
