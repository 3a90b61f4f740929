#!/usr/bin/env python3
"""Same model, same threads, same inputs: handoff's ort backend vs Python onnxruntime.

Runs `handoff run` on a small ort-only suite, then times the same model files
in Python's onnxruntime (pinned to the version handoff loads) with the same
session options and bit-identical inputs (handoff's SplitMix64 fill,
reimplemented below), and prints both medians and their ratio.

    python3 scripts/compare_python_ort.py          # uses target/release/handoff

The Python package is installed into .cache/venv-compare (from PyPI) on first
use; nothing is installed system-wide.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".cache", "venv-compare")
ORT_VERSION = "1.31.1"
MASK = (1 << 64) - 1


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        venv.create(VENV, with_pip=True)
    probe = subprocess.run([py, "-c", "import onnxruntime, numpy; print(onnxruntime.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != ORT_VERSION:
        subprocess.run([py, "-m", "pip", "install", "--quiet", f"onnxruntime=={ORT_VERSION}", "numpy"], check=True)
    return py


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def fill_random(name, seed, n, lo, hi):
    """handoff_backend::TensorSpec::generate for Fill::Random, f32."""
    import numpy as np
    state = (seed ^ fnv1a(name.encode())) & MASK
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        z ^= z >> 31
        u = (z >> 11) / float(1 << 53)
        out[i] = lo + (hi - lo) * u
    return out


def python_side():
    """Runs inside the venv: argv = [cases.json]; prints medians as JSON."""
    import numpy as np
    import onnxruntime as ort
    cases = json.load(open(sys.argv[2]))
    res = {}
    for c in cases:
        so = ort.SessionOptions()
        so.intra_op_num_threads = c["threads"]
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(c["model"], so, providers=["CPUExecutionProvider"])
        feeds = {}
        for t in c["inputs"]:
            n = int(np.prod(t["shape"]))
            feeds[t["name"]] = fill_random(t["name"], c["seed"], n, -1.0, 1.0).reshape(t["shape"])
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            sess.run(None, feeds)
        samples = []
        end = time.perf_counter() + c["seconds"]
        while time.perf_counter() < end or len(samples) < 20:
            t0 = time.perf_counter_ns()
            sess.run(None, feeds)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        res[c["id"]] = {"median_ms": statistics.median(samples), "n": len(samples)}
    print(json.dumps(res))


SUITE = """name: python-compare
models:
  - id: mlp
    source: {synthetic: {kind: mlp, width: 256, depth: 2}}
  - id: encoder
    source: {synthetic: {kind: encoder, width: 256, depth: 2}}
backends: [ort]
threads: [1, 2]
batch: [1, 8]
dims: {seq: [64]}
measure: {warmup: 300ms, min_time: 2s, max_time: 3s, target_ci: 0.005}
"""


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--python-side":
        return python_side()
    handoff = os.path.join(ROOT, "target", "release", "handoff")
    if not os.path.exists(handoff):
        subprocess.run(["cargo", "build", "--release", "-p", "handoff-cli"], cwd=ROOT, check=True)
    py = ensure_venv()
    work = os.path.join(ROOT, "reports", "python-compare")
    os.makedirs(work, exist_ok=True)
    suite = os.path.join(work, "suite.in.yaml")
    open(suite, "w").write(SUITE)
    out = os.path.join(work, "runs")
    shutil.rmtree(out, ignore_errors=True)
    plan = [json.loads(l) for l in subprocess.run([handoff, "validate", suite, "--json"], check=True,
                                                   capture_output=True, text=True).stdout.splitlines()]
    models = {}
    for line in subprocess.run([handoff, "validate", suite], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        line = line.strip()
        if line.startswith("model "):
            mid, rest = line[len("model "):].split(": ", 1)
            models[mid] = rest.split(" (")[0]
    # Rounds alternate handoff and Python case by case (ABAB), so drift of
    # this shared machine (neighbours, frequency) hits both sides alike; the
    # median over rounds is reported.
    rounds = int(os.environ.get("ROUNDS", "3"))
    h_ms = {c["id"]: [] for c in plan}
    p_ms = {c["id"]: [] for c in plan}
    busy = set()
    for rnd in range(rounds):
        for c in plan:
            cid = c["id"]
            out_dir = os.path.join(out, f"r{rnd}-{cid.replace('/', '_')}")
            subprocess.run([handoff, "run", suite, "--out", out_dir, "--quiet", "--filter", cid], check=True)
            rec = [json.loads(l) for l in open(os.path.join(out_dir, "results.jsonl"))
                   if json.loads(l)["case"]["id"] == cid][0]
            h_ms[cid].append(rec["latency_ms"]["p50"])
            if rec.get("machine", {}).get("busy"):
                busy.add(cid)
            case = {"id": cid, "model": models[c["model"]], "threads": c["threads"], "seed": 42,
                    "inputs": c["inputs"], "seconds": 2.0}
            cases_path = os.path.join(work, "case.json")
            json.dump([case], open(cases_path, "w"))
            res = json.loads(subprocess.run([py, __file__, "--python-side", cases_path], check=True,
                                            capture_output=True, text=True).stdout)
            p_ms[cid].append(res[cid]["median_ms"])
    print(f"ONNX Runtime {ORT_VERSION}, {rounds} alternating rounds, median of per-round medians")
    print(f"{'case':<32} {'handoff ort ms':>15} {'python ort ms':>14} {'ratio':>7}")
    worst = 0.0
    for c in plan:
        cid = c["id"]
        h = statistics.median(h_ms[cid])
        p = statistics.median(p_ms[cid])
        ratio = h / p
        worst = max(worst, abs(ratio - 1))
        flag = " BUSY" if cid in busy else ""
        print(f"{cid:<32} {h:>15.4f} {p:>14.4f} {ratio:>7.3f}{flag}")
    print(f"largest difference: {100 * worst:.1f}% (target: within 5%)")
    return 0 if worst <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
