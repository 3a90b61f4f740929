#!/usr/bin/env bash
# Runs the tests with every process under QEMU's user-mode emulator
# presenting another x86 CPU, so what the int8 kernels compute on that CPU
# class is checked on this machine: ONNX Runtime and tract pick their
# kernels from `cpuid`, which the emulator answers, and handoff reads its
# CPU class the same way. The default CPU is an AMD EPYC Zen 3 (AVX2, no
# AVX-512, no VNNI: u8 x s8 products summed in saturating 16 bits), the
# class of most cloud VMs and of GitHub's hosted x86 runners.
#
#   scripts/emulate_cpu.sh                      # the int8 tests (quantize)
#   scripts/emulate_cpu.sh --workspace          # every test
#   EMULATE_CPU=Haswell-v4 scripts/emulate_cpu.sh -p handoff-convert
#
# Arguments go to `cargo nextest run` (default: `-p handoff-cli --test
# quantize`). Emulation is 10-30x slower than the machine: its timings mean
# nothing, its numerics are the emulated CPU's. QEMU comes from Debian's
# `qemu-user-static` package (scripts/ensure-qemu.sh); x86_64 hosts only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

launcher=$(bash scripts/ensure-qemu.sh "${EMULATE_CPU:-EPYC-Milan}")

# Test binaries run under the emulator (Cargo's target runner); the
# `handoff` they start and its workers run under it too.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$launcher
export HANDOFF_WORKER_LAUNCHER=$launcher
[ $# -gt 0 ] || set -- -p handoff-cli --test quantize
cargo build --locked -q
echo "emulated CPU ${EMULATE_CPU:-EPYC-Milan}: $($launcher target/debug/handoff list-backends | grep '^int8 CPU class')" >&2
exec cargo nextest run --locked --no-fail-fast "$@"
