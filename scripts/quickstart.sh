#!/usr/bin/env bash
# README command 1: build, fetch what runs need, run the default suite.
#   scripts/quickstart.sh [SUITE] [handoff run options...]
set -euo pipefail
cd "$(dirname "$0")/.."
# A first argument that is an option (`--out DIR`) goes to `handoff run`.
suite=suites/quickstart.yaml
if [[ $# -gt 0 && $1 != -* ]]; then
    suite=$1
    shift
fi
echo "==> building handoff (release; the first build takes several minutes)"
cargo build --release --locked -p handoff-cli
echo "==> fetching runtime libraries into .cache/ (libonnxruntime and the Python baseline environment, from PyPI)"
./target/release/handoff setup
echo "==> headless Chromium for the report's browser test (Debian package, if not on PATH)"
bash scripts/ensure-chromium.sh >/dev/null
./target/release/handoff list-backends
echo "==> running $suite"
exec ./target/release/handoff run "$suite" "$@"
