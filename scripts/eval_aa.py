"""Summarises scripts/eval_aa.sh runs: per pair of the two model ids, CI
coverage of 1.0, verdicts, half-widths; overlap of the two cases' own CIs."""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

out, n = Path(sys.argv[1]), int(sys.argv[2])
pairs = defaultdict(list)  # (backend, threads, batch) -> [comparison]
overlap = defaultdict(list)
flops = {}
for i in range(1, n + 1):
    run = out / f"run-{i}"
    recs = [json.loads(l) for l in (run / "results.jsonl").read_text().splitlines() if l.strip()]
    by_id = {r["case"]["id"]: r for r in recs}
    for r in recs:
        if r.get("flops"):
            flops[r["case"]["model"]] = r["flops"]
    for line in (run / "comparisons.jsonl").read_text().splitlines():
        c = json.loads(line)
        if c["kind"] != "model" or c["metric"] != "p50":
            continue
        a, b = by_id[c["a"]]["case"], by_id[c["b"]]["case"]
        key = (f'{b["model"]} / {a["model"]}', b["backend"], b["threads"], b["batch"])
        pairs[key].append(c)
        la, lb = by_id[c["a"]]["latency_ms"], by_id[c["b"]]["latency_ms"]
        ca, cb = la["p50_ci95"], lb["p50_ci95"]
        overlap[key].append(ca[1] >= cb[0] and cb[1] >= ca[0])

cpu = (out / "cpu.txt").read_text().strip() if (out / "cpu.txt").exists() else "?"
print(f"{n} runs of {out}; CPU: {cpu}")
base = min(flops) if flops else None
for m in sorted(flops):
    print(f"FLOPs per inference of {m} (last case seen): {flops[m]:.4g} ({flops[m] / flops[base]:.3f}x {base})")
print()
print("| pair | backend | threads | batch | runs | CI covers 1.0 | slower | faster | no measurable difference | median ratio | median half-width | max half-width | case CIs overlap |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for key in sorted(pairs):
    cs = pairs[key]
    cover = sum(c["ci95"][0] <= 1.0 <= c["ci95"][1] for c in cs)
    v = lambda name: sum(c["verdict"] == name for c in cs)
    hw = [(c["ci95"][1] - c["ci95"][0]) / 2 / c["ratio"] for c in cs]
    print(
        f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(cs)} | {cover}/{len(cs)} | {v('slower')} | {v('faster')} | "
        f"{v('no measurable difference')} | {statistics.median(c['ratio'] for c in cs):.3f} | "
        f"±{100 * statistics.median(hw):.1f}% | ±{100 * max(hw):.1f}% | {sum(overlap[key])}/{len(overlap[key])} |"
    )
