#!/usr/bin/env bash
# Builds the GPU binaries of handoff on a machine without a system CUDA
# toolkit, from registry packages only.
#
#   scripts/build-gpu.sh [candle|tract|ort]...   (default: candle tract ort)
#
# One binary per flavour, each in its own target directory, because candle's
# CUDA (cudarc linked at build time) and tract-cuda (cudarc loaded with
# dlopen) cannot share one build:
#   target/gpu-candle/release/handoff   candle-native on cuda:0
#   target/gpu-tract/release/handoff    tract-cuda
#   target/gpu-ort/release/handoff      ONNX Runtime CUDA execution provider
#
# What it fetches (into $HANDOFF_CACHE, default .cache/):
#   cuda-13.0/        nvcc, headers, cudart, nvvm from the pinned nvidia-* wheels
#                     (candle compiles its kernels with nvcc at build time)
#   cuda-13.0/lib/stubs  link-time stand-ins for libcuda/libnvrtc/libcublas/
#                     libcublasLt/libcurand with the real SONAMEs; the real
#                     libraries are loaded at run time (driver from the
#                     machine, the rest from scripts/gpu-env.sh)
#
# Environment: CUDA_COMPUTE_CAP (default 90 = H100), CARGO_BUILD_JOBS.
# The candle build takes ~13 min cold on 2 cores; keep it out of CI.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${HANDOFF_CACHE:-$root/.cache}
cuda=$cache/cuda-13.0
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# Pinned so a rebuild months later uses the same compiler.
toolkit_wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

provision_toolkit() {
  if [ -x "$cuda/bin/nvcc" ]; then return; fi
  say "fetching the CUDA 13.0 toolkit wheels (${#toolkit_wheels[@]} packages)"
  local wheels=$cache/wheels-cuda-13.0
  mkdir -p "$wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "${toolkit_wheels[@]}"
  local tmp=$cuda.tmp.$$
  rm -rf "$tmp" && mkdir -p "$tmp"
  # Each wheel keeps its files under nvidia/cu13/, a toolkit-shaped tree.
  python3 - "$wheels" "$tmp" <<'EOF'
import glob, os, sys, zipfile
wheels, out = sys.argv[1], sys.argv[2]
for w in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    with zipfile.ZipFile(w) as z:
        for info in z.infolist():
            if not info.filename.startswith("nvidia/cu13/"):
                continue
            rel = info.filename[len("nvidia/cu13/"):]
            if not rel or info.is_dir():
                continue
            dest = os.path.join(out, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as dst:
                dst.write(src.read())
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, mode or 0o644)
EOF
  chmod +x "$tmp"/bin/* "$tmp"/nvvm/bin/* 2>/dev/null || true
  # Unversioned names for the linker.
  (cd "$tmp/lib" && ln -sf libcudart.so.13 libcudart.so)
  rm -rf "$cuda" && mv "$tmp" "$cuda"
  "$cuda/bin/nvcc" --version | tail -2 >&2
}

# Stub shared libraries exporting every entry point cudarc declares, with the
# SONAME of the real library, so the binary links here and binds to the real
# libraries on the GPU machine.
make_stubs() {
  local stubs=$cuda/lib/stubs
  if [ -f "$stubs/.done" ]; then return; fi
  say "generating link stubs for the CUDA driver and libraries"
  (cd "$root" && cargo fetch --locked >/dev/null)
  local cudarc
  cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)
  [ -d "$cudarc" ] || { echo "cudarc 0.19.10 sources not found after cargo fetch" >&2; exit 1; }
  mkdir -p "$stubs"
  local lib soname module
  for spec in cuda:libcuda.so.1:driver nvrtc:libnvrtc.so.13:nvrtc curand:libcurand.so.10:curand \
    cublas:libcublas.so.13:cublas cublasLt:libcublasLt.so.13:cublaslt; do
    IFS=: read -r lib soname module <<<"$spec"
    grep -ohE 'load::<_F>\("[A-Za-z0-9_]+"\)' "$cudarc/src/$module/sys/mod.rs" |
      sed -E 's/.*\("([A-Za-z0-9_]+)"\)/void \1(void) {}/' | sort -u >"$stubs/$lib.c"
    gcc -shared -fPIC -Wl,-soname,"$soname" -o "$stubs/lib$lib.so" "$stubs/$lib.c"
  done
  touch "$stubs/.done"
}

build() {
  local flavour=$1 feature=$2
  say "building target/gpu-$flavour/release/handoff (--features $feature)"
  (cd "$root" && cargo build --locked --release -p handoff-cli --features "$feature" \
    --target-dir "target/gpu-$flavour")
  echo "$root/target/gpu-$flavour/release/handoff"
}

flavours=("$@")
[ ${#flavours[@]} -gt 0 ] || flavours=(candle tract ort)
for f in "${flavours[@]}"; do
  case "$f" in
    candle)
      provision_toolkit
      make_stubs
      PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_HOME="$cuda" build candle cuda-candle
      ;;
    # tract-cuda and ORT load their CUDA libraries with dlopen: no toolkit
    # needed to build, only to run (scripts/gpu-env.sh).
    tract) build tract cuda-tract ;;
    ort) build ort cuda-ort ;;
    *) echo "unknown flavour '$f' (candle, tract, ort)" >&2; exit 2 ;;
  esac
done
