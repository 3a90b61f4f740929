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

# The between-process spread the runs estimated (sd of the log latency of
# one worker process, per case): what widened the intervals above.
spread = defaultdict(list)  # (backend, threads, batch) -> sd per case and run
for i in range(1, n + 1):
    for l in (out / f"run-{i}" / "results.jsonl").read_text().splitlines():
        r = json.loads(l) if l.strip() else {}
        info = r.get("rounds") or {}
        if info.get("process_var") is not None:
            c = r["case"]
            spread[(c["backend"], c["threads"], c["batch"])].append(info["process_var"] ** 0.5)
print("\nBetween-process sd per case (every model id and run):\n")
print("| backend | threads | batch | cases | median | 90th percentile | max |")
print("|---|---:|---:|---:|---:|---:|---:|")
for key in sorted(spread):
    s = sorted(spread[key])
    q90 = s[min(len(s) - 1, int(0.9 * len(s)))]
    print(f"| {key[0]} | {key[1]} | {key[2]} | {len(s)} | {100 * statistics.median(s):.2f}% | "
          f"{100 * q90:.2f}% | {100 * max(s):.2f}% |")

# What `handoff ab` (default --threshold 0.02) would decide on the same
# paired ratios: regressed when the CI excludes 1 and the ratio exceeds
# 1.02; A/A regressions are false alarms, enc-slow ones detections.
print("\n`handoff ab` rule (CI excludes 1 and change > 2%), per pair:\n")
print("| pair | backend | threads | batch | regressed | improved |")
print("|---|---|---:|---:|---:|---:|")
for key in sorted(pairs):
    cs = pairs[key]
    reg = sum(c["ci95"][0] > 1.0 and c["ratio"] > 1.02 for c in cs)
    imp = sum(c["ci95"][1] < 1.0 and c["ratio"] < 0.98 for c in cs)
    print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {reg}/{len(cs)} | {imp}/{len(cs)} |")
# Per run, as a gate over all eight configurations of a pair at once.
for name in sorted({k[0] for k in pairs}):
    keys = [k for k in pairs if k[0] == name]
    runs = len(pairs[keys[0]])
    flagged = sum(
        any(pairs[k][i]["ci95"][0] > 1.0 and pairs[k][i]["ratio"] > 1.02 for k in keys if i < len(pairs[k]))
        for i in range(runs)
    )
    print(f"\n{name}: runs with at least one of its {len(keys)} configurations regressed: {flagged}/{runs}")
