#!/usr/bin/env bash
# QEMU's x86_64 user-mode emulator, for running int8 code under a CPU this
# machine is not (scripts/emulate_cpu.sh, the emulated-AVX2 test): Debian's
# `qemu-user-static` unpacked into .cache/qemu (apt's mirror is one of the
# registries this project may use; no install, no root unless apt's package
# lists are missing). Prints the command that runs a program under the
# emulator presenting CPU model $1 (default EPYC-Milan: AMD EPYC Zen 3,
# AVX2 without AVX-512 or VNNI, whose int8 kernels saturate).
set -euo pipefail
dir="$(cd "$(dirname "$0")/.." && pwd)/.cache/qemu"
qemu="$dir/usr/bin/qemu-x86_64-static"
cpu=${1:-EPYC-Milan}
# The model less the features QEMU's TCG cannot emulate (each would print a
# warning in every process).
if [ "$cpu" = EPYC-Milan ]; then
  for f in pcid invpcid rdseed sha-ni rdpid fsrm fxsr-opt misalignsse \
    3dnowprefetch osvw topoext perfctr-core clzero xsaveerptr wbnoinvd \
    ibpb ibrs amd-stibp amd-ssbd nrip-save xsavec xsaves; do
    cpu="$cpu,$f=off"
  done
fi
if [ -x "$qemu" ]; then echo "$qemu -cpu $cpu"; exit 0; fi
mkdir -p "$dir"
cd "$dir"
if ! apt-get download qemu-user-static >&2; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
  apt-get download qemu-user-static >&2
fi
dpkg-deb -x qemu-user-static_*.deb "$dir"
rm -f qemu-user-static_*.deb
[ -x "$qemu" ] || { echo "qemu-user-static has no $qemu" >&2; exit 1; }
echo "$qemu -cpu $cpu"
