"""The python-torch baseline worker: the model as a team runs it before any
hand-off, PyTorch eager through transformers, loaded from the HF directory
(config.json + model.safetensors) the ONNX file was converted from. handoff
starts it (in .cache/venv-python-torch) and talks the same JSON lines as the
onnxruntime worker:

  {"cmd": "load", "hf_dir": DIR, "threads": N, "precision": "fp32" | "bf16"}
  {"cmd": "bind", "inputs": [{"name", "dtype", "shape", "path"}]}   raw little-endian files
  {"cmd": "run"}       -> {"ok": true, "inner_ns": N}   the forward call timed inside Python
  {"cmd": "outputs", "dir": DIR} -> each output written raw to DIR, with dtype and shape

Outputs match handoff's converted ONNX model, so the same parity check
applies: `last_hidden_state`, then `sentence_embedding` (the attention-mask-
weighted mean over tokens) for an encoder, or `logits` for a
`...ForSequenceClassification` model (AutoModelForSequenceClassification).
Precision "bf16" runs the forward call under torch.autocast(bfloat16) (weights
stay fp32; matmuls run in bf16, fast on AVX512-BF16 and AMX) and returns fp32
outputs. Every reply is {"ok": true, ...} or
{"ok": false, "error": "..."}; stdout carries only replies.
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
    # Local files only: a hub download at run time would be a silent
    # dependency on the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import numpy as np
    import torch

    model = None
    classifier = False
    bf16 = False
    feeds = {}
    last = []
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.get("cmd")
        try:
            if cmd == "load":
                # Before any parallel work: torch refuses to change its
                # inter-op pool once used.
                torch.set_num_interop_threads(1)
                torch.set_num_threads(int(req["threads"]))
                import transformers

                config = transformers.AutoConfig.from_pretrained(req["hf_dir"])
                classifier = any(
                    a.endswith("ForSequenceClassification") for a in (config.architectures or [])
                )
                auto = (
                    transformers.AutoModelForSequenceClassification
                    if classifier
                    else transformers.AutoModel
                )
                t0 = time.perf_counter_ns()
                model = auto.from_pretrained(req["hf_dir"], dtype=torch.float32)
                model.eval()
                bf16 = req.get("precision", "fp32") == "bf16"
                reply = {
                    "ok": True,
                    "version": torch.__version__,
                    "transformers": transformers.__version__,
                    "attention": getattr(model.config, "_attn_implementation", None),
                    "python": platform.python_version(),
                    "load_ns": time.perf_counter_ns() - t0,
                    "precision": "bf16 autocast" if bf16 else "fp32",
                }
            elif cmd == "bind":
                feeds = {
                    i["name"]: torch.from_numpy(
                        np.fromfile(i["path"], dtype=i["dtype"]).reshape(i["shape"])
                    )
                    for i in req["inputs"]
                }
                reply = {"ok": True}
            elif cmd == "run":
                t0 = time.perf_counter_ns()
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    if classifier:
                        out = model(**feeds, output_hidden_states=True)
                        last = [("last_hidden_state", out.hidden_states[-1]), ("logits", out.logits)]
                    else:
                        hidden = model(**feeds).last_hidden_state
                        mask = feeds["attention_mask"].to(hidden.dtype).unsqueeze(-1)
                        pooled = (hidden * mask).sum(1) / mask.sum(1)
                        last = [("last_hidden_state", hidden), ("sentence_embedding", pooled)]
                reply = {"ok": True, "inner_ns": time.perf_counter_ns() - t0}
            elif cmd == "outputs":
                outs = []
                for name, value in last:
                    path = os.path.join(req["dir"], f"out{len(outs)}.bin")
                    value = np.ascontiguousarray(value.float().numpy())
                    value.tofile(path)
                    outs.append({"name": name, "dtype": str(value.dtype), "shape": list(value.shape), "path": path})
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
