"""The reference int8 model: ONNX Runtime's own `quantize_dynamic` on the same
fp32 ONNX file handoff quantises. handoff runs this (suite variant
`ort-int8-dynamic`) in .cache/venv-quant, created from PyPI with pinned
versions, so the report can put handoff's int8 beside ORT's.

usage: python scripts/ort_quantize.py SRC.onnx OUT.onnx [--per-channel] [--reduce-range]

handoff passes --per-channel always and --reduce-range for CPUs without VNNI
(7-bit weights: their kernels' 16-bit pair sums would saturate), ORT's most
accurate configuration for the CPU the model runs on.
"""
import sys

from onnxruntime.quantization import QuantType, quantize_dynamic


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = args
    # ORT's defaults except the weight type, spelled out so a change of
    # default upstream does not silently change the reference.
    quantize_dynamic(
        src,
        out,
        weight_type=QuantType.QInt8,
        per_channel="--per-channel" in sys.argv,
        reduce_range="--reduce-range" in sys.argv,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
