#!/usr/bin/env bash
# Is tract slow on this machine because the CPU charges for switching from
# AVX to legacy-SSE instructions? Builds a small tract-onnx timing program
# twice, against tract-linalg 0.23.9 as published and against a copy whose
# x86 kernels are VEX-encoded throughout (legacy movq/movd/movaps/pinsrd/
# pinsrw written as their v-forms, vzeroupper before each kernel returns:
# the same arithmetic), then times MODEL with both in interleaved runs.
# handoff's own tract backend stays the published crate; this only explains
# its figures. `handoff list-backends` prints the switch cost it measures.
#
# usage: scripts/tract-sse-check.sh MODEL.onnx [LAUNCHER...]
#   e.g. scripts/tract-sse-check.sh models/cache/converted/<minilm>.int8-dynamic.onnx scripts/as-cpu.sh avx2
# env: ROUNDS (3), ITERS timed runs per measurement (3), BATCH (1), SEQ (128),
#      THREADS (1). The model's inputs must be int64 [batch, seq] (BERT-style).
# Builds in target/tract-sse (about 17 min cold on 2 cores, once).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="$(realpath "${1:?usage: $0 MODEL.onnx [LAUNCHER...]}")"
shift
rounds="${ROUNDS:-3}" iters="${ITERS:-3}" batch="${BATCH:-1}" seq="${SEQ:-128}" threads="${THREADS:-1}"
dir="$root/target/tract-sse"
mkdir -p "$dir"

crate() { # crate NAME [PATCH_PATH]
    mkdir -p "$dir/$1/src"
    cp "$root/Cargo.lock" "$dir/$1/Cargo.lock"
    cat >"$dir/$1/Cargo.toml" <<EOF
[package]
name = "tract-sse-$1"
version = "0.1.0"
edition = "2021"
[workspace]
[dependencies]
tract-onnx = "=0.23.9"
tract-linalg = { version = "=0.23.9", features = ["multithread-mm"] }
EOF
    if [[ -n "${2:-}" ]]; then
        printf '[patch.crates-io]\ntract-linalg = { path = "%s" }\n' "$2" >>"$dir/$1/Cargo.toml"
    fi
    cat >"$dir/$1/src/main.rs" <<'EOF'
// Prints the median ms of ITERS runs of MODEL, prepared as handoff's tract
// backend prepares it (optimised plan, symbolic dims kept).
use std::time::Instant;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::SimpleState;
use tract_onnx::tract_core::runtime::RunOptions;

fn main() -> TractResult<()> {
    let a: Vec<String> = std::env::args().collect();
    let n = |i: usize| a[i].parse::<usize>().unwrap();
    let (batch, seq, iters, threads) = (n(2), n(3), n(4), n(5));
    let model = tract_onnx::onnx().model_for_path(&a[1])?.into_typed()?.into_optimized()?;
    let executor = if threads > 1 { Executor::multithread(threads) } else { Executor::SingleThread };
    let options = RunOptions { executor: Some(executor), ..Default::default() };
    let plan = model.into_runnable_with_options(&options)?;
    let mut state = SimpleState::new(&plan)?;
    let tensor = |f: &dyn Fn(usize, usize) -> i64| -> TValue {
        Tensor::from(tract_ndarray::Array2::from_shape_fn((batch, seq), |(b, s)| f(b, s))).into()
    };
    let inputs = || {
        let ids = tensor(&|b, s| ((b * 31 + s * 7) % 1000 + 100) as i64);
        let inputs = tvec![ids, tensor(&|_, _| 1), tensor(&|_, _| 0)];
        inputs.into_iter().take(plan.model().inputs.len()).collect::<TVec<_>>()
    };
    state.run(inputs())?;
    let mut ms: Vec<f64> = (0..iters)
        .map(|_| {
            let i = inputs();
            let t = Instant::now();
            state.run(i).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!("{:.3}", ms[ms.len() / 2]);
    Ok(())
}
EOF
}

crate stock
(cd "$dir/stock" && cargo fetch -q)
# The patched copy is made once: copying it again would rebuild tract.
if [[ ! -e "$dir/linalg-vex/.vex-only" ]]; then
    src="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -name tract-linalg-0.23.9 | head -1)"
    rm -rf "$dir/linalg-vex"
    cp -r "$src" "$dir/linalg-vex"
    mapfile -t templates < <(find "$dir/linalg-vex/x86_64" -name '*.j2')
    sed -i -E \
        -e 's/^(\s*)(movq|movd|movaps)(\s+xmm)/\1v\2\3/' \
        -e 's/^(\s*)(pinsrd|pinsrw)(\s+)(xmm[0-9{}a-z]+),/\1v\2\3\4, \4,/' \
        -e 's/^(\s*)mov(\s+)rsp,(\s*)rbp/\1vzeroupper\n\1mov\2rsp,\3rbp/' \
        "${templates[@]}"
    touch "$dir/linalg-vex/.vex-only"
fi
crate vex "$dir/linalg-vex"
for v in stock vex; do
    (cd "$dir/$v" && CARGO_TARGET_DIR="$dir/target" cargo build --release -q)
done

echo "tract MiniLM-style timing: $(basename "$model"), batch $batch, seq $seq, $threads thread(s), median of $iters runs each; launcher: ${*:-none}"
declare -A all
for r in $(seq "$rounds"); do
    for v in $( ( echo stock; echo vex ) | shuf); do
        ms=$("$@" "$dir/target/release/tract-sse-$v" "$model" "$batch" "$seq" "$iters" "$threads")
        echo "round $r  $v  $ms ms"
        all[$v]+="$ms "
    done
done
python3 - "${all[stock]}" "${all[vex]}" <<'EOF'
import statistics, sys
stock, vex = ([float(x) for x in a.split()] for a in sys.argv[1:3])
ms, mv = statistics.median(stock), statistics.median(vex)
print(f"stock tract-linalg: median {ms:.1f} ms ({min(stock):.1f}-{max(stock):.1f})")
print(f"VEX-only kernels:   median {mv:.1f} ms ({min(vex):.1f}-{max(vex):.1f})")
print(f"stock / VEX-only: {ms / mv:.2f}x")
EOF
