#!/usr/bin/env bash
# Runs a command as if on another int8 CPU class, at native speed: every
# `cpuid` it and its children execute answers without the hidden features
# (scripts/cpuid_mask.c, through the kernel's CPUID faulting), so ONNX
# Runtime, tract and PyTorch pick that class's kernels on this machine's
# cores. Its numerics are the class's; its timings are that code on this
# CPU, which handoff's reports state (the Machine line names what cpuid
# hid). Needs `cpuid_fault` in /proc/cpuinfo (Intel, or a KVM guest) and a
# C compiler (the one Rust links with).
#
#   scripts/as-cpu.sh avx2|avx512 COMMAND [ARGS...]
#
# e.g. scripts/as-cpu.sh avx2 target/release/handoff run suites/quickstart.yaml
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
profile=${1:?usage: scripts/as-cpu.sh avx2|avx512 COMMAND [ARGS...]}
shift
case "$profile" in avx2 | avx512) ;; *) echo "as-cpu.sh: profile must be avx2 or avx512, not $profile" >&2; exit 2 ;; esac
[ $# -gt 0 ] || { echo "usage: scripts/as-cpu.sh avx2|avx512 COMMAND [ARGS...]" >&2; exit 2; }
grep -qw cpuid_fault /proc/cpuinfo || {
  echo "as-cpu.sh: this CPU or VM has no CPUID faulting (no cpuid_fault in /proc/cpuinfo); use scripts/emulate_cpu.sh (QEMU) instead" >&2
  exit 1
}
src="$root/scripts/cpuid_mask.c"
lib="$root/.cache/cpuid-mask/libcpuid_mask.so"
if [ ! -f "$lib" ] || [ "$src" -nt "$lib" ]; then
  mkdir -p "$(dirname "$lib")"
  ${CC:-cc} -O2 -shared -fPIC -Wall -Werror -o "$lib.tmp" "$src"
  mv "$lib.tmp" "$lib"
fi
export HANDOFF_CPUID_MASK=$profile
export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
exec "$@"
