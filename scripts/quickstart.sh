#!/usr/bin/env bash
# README command 1: build, fetch what runs need, run the default suite.
#   scripts/quickstart.sh [SUITE] [handoff run options...]
set -euo pipefail
cd "$(dirname "$0")/.."
suite=${1:-suites/quickstart.yaml}
shift || true
echo "==> building handoff (release; the first build takes several minutes)"
cargo build --release --locked -p handoff-cli
echo "==> fetching runtime libraries into .cache/ (libonnxruntime and the Python baseline environment, from PyPI)"
./target/release/handoff setup
./target/release/handoff list-backends
echo "==> running $suite"
exec ./target/release/handoff run "$suite" "$@"
