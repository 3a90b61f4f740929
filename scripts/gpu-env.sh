#!/usr/bin/env bash
# Fetches the CUDA run-time libraries a GPU build of handoff loads, and prints
# the environment to use them:
#
#   eval "$(scripts/gpu-env.sh candle)"   # or tract, ort
#   target/gpu-candle/release/handoff list-backends
#   target/gpu-candle/release/handoff run suites/gpu.yaml
#
# The NVIDIA driver (libcuda.so.1) must come from the machine. Everything else
# comes from pinned PyPI wheels into $HANDOFF_CACHE (default .cache/):
#   candle, tract: cudart, nvrtc, cublas(+Lt), curand, cudnn for CUDA 13
#                  (tract-cuda also compiles kernels with NVRTC at run time
#                  and needs the CUDA headers: NVRTC_INCLUDE points at them)
#   ort:           the onnxruntime-gpu wheel's library and its CUDA/cuDNN
#                  dependencies as that wheel declares them
# These are large (cuBLAS + cuDNN: over 1 GB); fetch them on the GPU machine.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${HANDOFF_CACHE:-$root/.cache}
flavour=${1:?usage: scripts/gpu-env.sh candle|tract|ort}
ORT_VERSION=1.31.1

cuda13_runtime=(
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cudnn-cu13==9.13.0.50
)

install_into() {
  local dir=$1
  shift
  if [ -f "$dir/.done" ]; then return; fi
  python3 -m pip install --quiet --no-deps --only-binary=:all: --target "$dir.tmp.$$" "$@" >&2
  rm -rf "$dir" && mv "$dir.tmp.$$" "$dir" && touch "$dir/.done"
}

lib_path_of() {
  find "$1" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -
}

case "$flavour" in
  candle | tract)
    dir=$cache/cuda-13.0-runtime
    install_into "$dir" "${cuda13_runtime[@]}"
    echo "export LD_LIBRARY_PATH=$(lib_path_of "$dir")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    # tract-cuda's NVRTC kernels include CUDA headers at run time.
    [ -d "$cache/cuda-13.0/include" ] && echo "export NVRTC_INCLUDE=$cache/cuda-13.0/include"
    ;;
  ort)
    dir=$cache/onnxruntime-gpu-$ORT_VERSION
    # With dependencies: the wheel declares the CUDA/cuDNN wheels it was built against.
    if [ ! -f "$dir/.done" ]; then
      python3 -m pip install --quiet --only-binary=:all: --target "$dir.tmp.$$" \
        "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION" >&2
      rm -rf "$dir" && mv "$dir.tmp.$$" "$dir" && touch "$dir/.done"
    fi
    echo "export ORT_DYLIB_PATH=$dir/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION"
    echo "export LD_LIBRARY_PATH=$(lib_path_of "$dir")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    ;;
  *)
    echo "unknown flavour '$flavour' (candle, tract, ort)" >&2
    exit 2
    ;;
esac
