"""The Python half of `handoff gil`: tokenise the same texts with 1..N
Python threads, two ways, and report texts per second.

  tokenizers    the `tokenizers` package (Rust inside), one `encode` per text
  pure-python   a WordPiece tokenizer written in Python (BERT's basic
                tokenisation + greedy longest-match), one call per text: the
                kind of preprocessing that holds the GIL

The pure-Python ids are checked against `tokenizers` first, so both do the
same work. Usage (handoff runs it in .cache/venv-python-ort):

  python gil_tokenize.py --tokenizer tokenizer.json --texts FILE --seq 128 \
      --workers 1,2,4 --reps 3

Prints one JSON object on stdout.
"""
import argparse
import json
import sys
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor


def is_punct(c):
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


class WordPiece:
    def __init__(self, vocab, seq):
        self.vocab = vocab
        self.seq = seq
        self.unk = vocab["[UNK]"]
        self.cls = vocab["[CLS]"]
        self.sep = vocab["[SEP]"]
        self.pad = vocab.get("[PAD]", 0)

    def words(self, text):
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out, word = [], []
        for c in text:
            if c.isspace():
                if word:
                    out.append("".join(word))
                    word = []
            elif is_punct(c):
                if word:
                    out.append("".join(word))
                    word = []
                out.append(c)
            else:
                word.append(c)
        if word:
            out.append("".join(word))
        return out

    def pieces(self, word):
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end, cur = len(word), None
            while start < end:
                sub = word[start:end]
                if start > 0:
                    sub = "##" + sub
                if sub in self.vocab:
                    cur = self.vocab[sub]
                    break
                end -= 1
            if cur is None:
                return [self.unk]
            ids.append(cur)
            start = end
        return ids

    def encode(self, text):
        ids = [self.cls]
        for w in self.words(text):
            ids.extend(self.pieces(w))
        ids = ids[: self.seq - 1] + [self.sep]
        return ids + [self.pad] * (self.seq - len(ids))


def rate(fn, texts, workers, reps):
    """Best of `reps` wall times to encode every text with `workers` threads."""
    chunks = [texts[i::workers] for i in range(workers)]

    def work(chunk):
        for t in chunk:
            fn(t)

    best = float("inf")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(work, chunks))
            best = min(best, time.perf_counter() - t0)
    return len(texts) / best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--texts", required=True, help="one text per line")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(a.tokenizer)
    tok.enable_padding(length=a.seq)
    tok.enable_truncation(max_length=a.seq)
    with open(a.tokenizer, encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    wp = WordPiece(vocab, a.seq)
    with open(a.texts, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    distinct = list(dict.fromkeys(texts))
    agree = sum(wp.encode(t) == tok.encode(t).ids for t in distinct)
    workers = [int(w) for w in a.workers.split(",")]
    out = {
        "python": sys.version.split()[0],
        "gil_enabled": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "pure_python_agrees": f"{agree}/{len(distinct)}",
        "tokenizers": {w: rate(tok.encode, texts, w, a.reps) for w in workers},
        "pure_python": {w: rate(wp.encode, texts, w, a.reps) for w in workers},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
