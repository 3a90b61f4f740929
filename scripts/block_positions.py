"""Is `measure.settle` long enough for your model? For each case of an
interleaved run, the median latency of the 1st, 2nd, ... timed run of a
block (over the blocks that have at least K runs, so every position is
taken from the same blocks). A first position well above the others means
the blocks start before the worker is back to speed: raise `settle`.

    python3 scripts/block_positions.py RUN_DIR [K=4]
"""
import json
import statistics
import sys
from pathlib import Path

run, k = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4
for line in (run / "results.jsonl").read_text().splitlines():
    r = json.loads(line)
    rounds, samples = r.get("rounds"), r.get("samples_ms") or []
    if not rounds or not rounds.get("block_runs"):
        continue
    positions = [[] for _ in range(k)]
    i = 0
    for b in rounds["block_runs"]:
        if b >= k:
            for p in range(k):
                positions[p].append(samples[i + p])
        i += b
    if not positions[0]:
        print(f"{r['case']['id']}: no block has {k} runs")
        continue
    med = [statistics.median(p) for p in positions]
    rest = statistics.median(med[1:]) if k > 1 else med[0]
    print(
        f"{r['case']['id']}: {len(positions[0])} blocks; median ms by position: "
        + ", ".join(f"{m:.3f}" for m in med)
        + f"; first / rest {med[0] / rest:.3f}"
    )
