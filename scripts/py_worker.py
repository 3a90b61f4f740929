"""The python-onnxruntime baseline worker. handoff starts it (in
.cache/venv-python-ort) and talks JSON lines over stdin/stdout:

  {"cmd": "load", "model": PATH, "threads": N, "optimization": LEVEL, "denormals": "keep"|"flush"}
  {"cmd": "bind", "inputs": [{"name", "dtype", "shape", "path"}]}   raw little-endian files
  {"cmd": "run"}       -> {"ok": true, "inner_ns": N}   session.run timed inside Python
  {"cmd": "outputs", "dir": DIR} -> each output written raw to DIR, with dtype and shape

Every reply is {"ok": true, ...} or {"ok": false, "error": "..."}. stdout
carries only replies; anything else goes to stderr. The worker exits when its
parent does (stdin closes, or the parent pid changes while a call runs).
"""
import json
import os
import platform
import sys
import threading
import time


def watch_parent():
    parent = os.getppid()
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def main() -> int:
    threading.Thread(target=watch_parent, daemon=True).start()
    proto = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    import numpy as np
    import onnxruntime as ort

    sess = None
    feeds = {}
    last = []
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.get("cmd")
        try:
            if cmd == "load":
                so = ort.SessionOptions()
                so.intra_op_num_threads = int(req["threads"])
                so.inter_op_num_threads = 1
                so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
                so.graph_optimization_level = {
                    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                }[req.get("optimization", "all")]
                flush = req.get("denormals", "keep") == "flush"
                if flush:
                    so.add_session_config_entry("session.set_denormal_as_zero", "1")
                t0 = time.perf_counter_ns()
                sess = ort.InferenceSession(req["model"], so, providers=["CPUExecutionProvider"])
                # ORT sets DAZ/FTZ on the thread that creates the process's
                # first session (this worker's only one) as well as on its
                # pool threads; the Rust backend sets the same per run.
                tiny = np.float32(1e-30) * np.float32(1e-10)
                if flush and tiny != 0:
                    raise RuntimeError(f"denormals: flush did not take on the calling thread (1e-30 * 1e-10 = {tiny})")
                reply = {
                    "ok": True,
                    "version": ort.__version__,
                    "python": platform.python_version(),
                    "load_ns": time.perf_counter_ns() - t0,
                }
            elif cmd == "bind":
                feeds = {
                    i["name"]: np.fromfile(i["path"], dtype=i["dtype"]).reshape(i["shape"])
                    for i in req["inputs"]
                }
                reply = {"ok": True}
            elif cmd == "run":
                # Test hook: how handoff copes with a worker that dies or hangs.
                fail = os.environ.get("HANDOFF_PY_WORKER_FAIL")
                if fail == "crash":
                    os._exit(9)
                elif fail == "hang":
                    time.sleep(1e9)
                t0 = time.perf_counter_ns()
                last = sess.run(None, feeds)
                reply = {"ok": True, "inner_ns": time.perf_counter_ns() - t0}
            elif cmd == "outputs":
                outs = []
                for meta, value in zip(sess.get_outputs(), last):
                    path = os.path.join(req["dir"], f"out{len(outs)}.bin")
                    value = np.ascontiguousarray(value)
                    value.tofile(path)
                    outs.append({"name": meta.name, "dtype": str(value.dtype), "shape": list(value.shape), "path": path})
                reply = {"ok": True, "outputs": outs}
            else:
                reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        except Exception as e:  # the case's cell says what Python said
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
