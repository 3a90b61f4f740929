"""The Python side of the serving comparison: a FastAPI service that loads
the model once at start-up (the lifespan pattern) and answers the same API
as `handoff serve`:

  POST /embed  {"texts": ["...", ...]}  ->  {"embeddings": [[...], ...]}
  GET  /health

It is what a team would deploy before handing off: uvicorn, one process,
the `tokenizers` package (Rust underneath) padding to --seq, onnxruntime
with --threads intra-op threads. Like `handoff serve`, one request is in
the model at a time (a lock), so the two differ in language and stack, not
in architecture.

With `--task text-classification` (PyTorch only) it is the service teams
copy for a classifier: `transformers.pipeline("text-classification")` loaded
in the lifespan handler, called per request:

  POST /predict  {"text": "..."}  ->  {"label": "...", "score": 0.97}

The pipeline is given the model (AutoModelForSequenceClassification from
--hf-dir) and the fast tokenizer from --tokenizer, and pads to --seq like
`handoff serve`, so both run the same tokens: the difference is the stack.

handoff starts it (in .cache/venv-python-ort) for `http` cases of the
python-onnxruntime backend, and with `--runtime torch --hf-dir DIR` (in
.cache/venv-python-torch) for python-torch: the same service with the model
in PyTorch eager through transformers, what a team serves before it hands
off. Tokenisation is the same in both, and the same as `handoff serve`'s.

  python fastapi_server.py --model M.onnx --tokenizer tokenizer.json \
      --threads 1 --seq 128 [--runtime onnxruntime|torch] [--hf-dir DIR] \
      [--task embed|text-classification] \
      [--optimization disable|basic|extended|all] [--denormals keep|flush] \
      [--host 127.0.0.1] [--port 0] [--watch-stdin]

--optimization and --denormals are the suite's `backend_options.ort`, as
the per-call Python baseline applies them (onnxruntime only).

It prints `listening on http://HOST:PORT` once the model is loaded; with
--watch-stdin it exits when its stdin closes (its parent is gone). Exit
codes: 1 the model failed to load, 2 bad arguments or port in use, 3 an
op onnxruntime lacks, 4 a package is missing.
"""
import argparse
import errno
import os
import socket
import sys
import threading
from contextlib import asynccontextmanager


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--watch-stdin", action="store_true")
    p.add_argument("--runtime", choices=["onnxruntime", "torch"], default="onnxruntime")
    p.add_argument("--hf-dir", help="the HF directory (config.json + model.safetensors), for --runtime torch")
    p.add_argument("--task", choices=["embed", "text-classification"], default="embed")
    p.add_argument("--optimization", choices=["disable", "basic", "extended", "all"], default="all")
    p.add_argument("--denormals", choices=["keep", "flush"], default="keep")
    return p.parse_args()


def flush_denormals_here():
    """A function that sets DAZ and FTZ on the thread that calls it
    (MXCSR |= 0x8040). ORT's session.set_denormal_as_zero sets its pool
    threads and, once, the thread that creates the first session; FastAPI
    runs each request on a pool thread of its own, which at one intra-op
    thread does all the work, so each call sets it there. Python has no
    call for MXCSR: this runs five x86-64 instructions from an executable
    page."""
    import ctypes
    import mmap
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"--denormals flush is implemented for x86_64 only, not {platform.machine()}")
    code = bytes(
        [0x0F, 0xAE, 0x5C, 0x24, 0xFC]  # stmxcsr [rsp-4]
        + [0x81, 0x4C, 0x24, 0xFC, 0x40, 0x80, 0x00, 0x00]  # or dword [rsp-4], 0x8040
        + [0x0F, 0xAE, 0x54, 0x24, 0xFC]  # ldmxcsr [rsp-4]
        + [0x8B, 0x44, 0x24, 0xFC]  # mov eax, [rsp-4]
        + [0xC3]  # ret
    )
    page = mmap.mmap(-1, len(code), prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    set_flags = ctypes.CFUNCTYPE(ctypes.c_uint32)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    set_flags.page = page  # mapped as long as the function lives
    return set_flags


def load_onnxruntime(args):
    """A function from token fields to the sentence embeddings, as numpy."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[args.optimization]
    flush = None
    if args.denormals == "flush":
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        flush = flush_denormals_here()
        flush()
        tiny = np.float32(1e-30) * np.float32(1e-10)
        if tiny != 0:
            raise RuntimeError(f"--denormals flush did not take (1e-30 * 1e-10 = {tiny})")
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(fields):
        feeds = {n: np.asarray(fields[n], dtype=np.int64) for n in names}
        if flush is not None:
            flush()
        return sess.run(None, feeds)[-1]

    return run


def load_torch(args):
    """The same with PyTorch eager: transformers' AutoModel and the
    sentence-transformers mean pooling, under inference_mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    torch.set_num_interop_threads(1)
    torch.set_num_threads(args.threads)
    model = transformers.AutoModel.from_pretrained(args.hf_dir, dtype=torch.float32).eval()

    def run(fields):
        with torch.inference_mode():
            feeds = {k: torch.tensor(v, dtype=torch.int64) for k, v in fields.items()}
            hidden = model(**feeds).last_hidden_state
            mask = feeds["attention_mask"].to(hidden.dtype).unsqueeze(-1)
            return ((hidden * mask).sum(1) / mask.sum(1)).numpy()

    return run


def load_pipeline(args):
    """A function from one text to {"label", "score"}: the transformers
    text-classification pipeline, as a team serves a classifier."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import inspect

    import torch
    import transformers

    torch.set_num_interop_threads(1)
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        args.hf_dir, dtype=torch.float32
    ).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=args.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = "[PAD]"
    # DistilBERT takes no token types.
    takes = inspect.signature(model.forward).parameters
    tok.model_input_names = [n for n in ("input_ids", "token_type_ids", "attention_mask") if n in takes]
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=tok, device=-1)

    def predict(text):
        out = pipe(text, padding="max_length", truncation=True, max_length=args.seq)
        return {"label": out[0]["label"], "score": float(out[0]["score"])}

    return predict


def main() -> int:
    args = parse_args()
    if args.runtime == "torch" and not args.hf_dir:
        print("error: --runtime torch needs --hf-dir", file=sys.stderr)
        return 2
    if args.task == "text-classification" and args.runtime != "torch":
        print("error: --task text-classification runs the transformers pipeline: use --runtime torch", file=sys.stderr)
        return 2
    try:
        import uvicorn
        from fastapi import FastAPI, HTTPException
        from pydantic import BaseModel
        from tokenizers import Tokenizer
    except ImportError as e:
        print(f"error: {e} (run `handoff setup`)", file=sys.stderr)
        return 4

    # Bind first: a port in use is an error before the model loads.
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY on accepted
    # connections only when the listening socket's `proto` says TCP, and
    # without it every keep-alive response (headers and body written
    # separately) waits ~40 ms for a delayed ACK. Set on the listener too:
    # Linux copies it to accepted sockets.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(f"error: port {args.port} on {args.host} is already in use", file=sys.stderr)
        else:
            print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    # Listen now: uvicorn starts accepting only after the lifespan start-up,
    # and the ready line is printed inside it; connections made in between
    # wait in the backlog instead of being refused.
    sock.listen(128)
    host, port = sock.getsockname()[:2]

    state = {}
    lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app):
        try:
            if args.task == "text-classification":
                state["predict"] = load_pipeline(args)
                state["predict"]("warm-up")
            else:
                load = load_torch if args.runtime == "torch" else load_onnxruntime
                state["run"] = load(args)
                tok = Tokenizer.from_file(args.tokenizer)
                tok.enable_padding(length=args.seq)
                tok.enable_truncation(max_length=args.seq)
                state["tok"] = tok
                embed_texts(["warm-up"])
        except Exception as e:  # noqa: BLE001 - any load failure ends the service
            text = str(e).replace("\n", " ")
            print(f"error: {text}", file=sys.stderr, flush=True)
            missing_op = "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text
            os._exit(4 if isinstance(e, ImportError) else 3 if missing_op else 1)
        print(f"listening on http://{host}:{port}", flush=True)
        yield
        state.clear()

    def embed_texts(texts):
        with lock:
            enc = state["tok"].encode_batch(texts)
            fields = {
                "input_ids": [e.ids for e in enc],
                "attention_mask": [e.attention_mask for e in enc],
                "token_type_ids": [e.type_ids for e in enc],
            }
            out = state["run"](fields)
        return out.reshape(len(texts), -1).tolist()

    class EmbedRequest(BaseModel):
        texts: list[str]

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    def health():
        return {"status": "ok", "threads": args.threads, "seq": args.seq}

    # A sync endpoint: FastAPI runs it in its thread pool, as a team would.
    @app.post("/embed")
    def embed(req: EmbedRequest):
        if "run" not in state:
            raise HTTPException(404, "this service runs a text-classification pipeline: use /predict")
        if not 1 <= len(req.texts) <= args.max_batch:
            raise HTTPException(422, f"`texts` must hold 1 to {args.max_batch} strings")
        return {"embeddings": embed_texts(req.texts)}

    class PredictRequest(BaseModel):
        text: str

    @app.post("/predict")
    def predict(req: PredictRequest):
        if "predict" not in state:
            raise HTTPException(404, "this service embeds: start it with --task text-classification for /predict")
        with lock:
            return state["predict"](req.text)

    if args.watch_stdin:
        def watch():
            sys.stdin.read()
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
