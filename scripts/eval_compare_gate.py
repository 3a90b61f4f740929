"""Summarises scripts/eval_compare_gate.sh: per set of `handoff ab` runs,
how many runs regressed, per case and in all, with the changes measured,
and how many of the runs were outliers (beyond 1.3x their case's median:
a tail quantile with more than half its tail among them moves with them),
in how many runs the gate left out rounds with a host stall and in how
many it kept them all (stalls in over a fifth of the rounds)."""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

out, n = Path(sys.argv[1]), int(sys.argv[2])
cpu = (out / "cpu.txt").read_text().strip() if (out / "cpu.txt").exists() else "?"
print(f"up to {n} runs per set in {out}; CPU: {cpu}\n")

flops = {}
for name in ("slow-p50", "slow-p99"):
    for run in sorted(out.glob(f"{name}-*")):
        if not (run / "results.jsonl").exists():
            continue
        for line in (run / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("flops") and r["case"]["backend"] == "tract":
                flops[(name, r["case"]["model"])] = r["flops"]
for name in ("slow-p50", "slow-p99"):
    base, head = flops.get((name, "enc.base")), flops.get((name, "enc.head"))
    if base and head:
        print(f"{name}: FLOPs per inference (tract's cost model) base {base:.4g}, head {head:.4g} ({head / base:.3f}x)")
print()

sets = {
    "aa-p50": ("same file, p50", "false regression"),
    "slow-p50": ("+5% FLOPs head, p50", "detected"),
    "aa-p99": ("same file, p99", "false regression"),
    "slow-p99": ("+10% FLOPs head, p99", "detected"),
    "aa-p99k": ("same file, p99, rounds with host stalls kept (the p99 runs)", "false regression"),
    "slow-p99k": ("+10% FLOPs head, p99, rounds with host stalls kept (the p99 runs)", "detected"),
    "aa-p95": ("same file, p95 (the p99 runs)", "false regression"),
    "slow-p95": ("+10% FLOPs head, p95 (the p99 runs)", "detected"),
    "aa-p90": ("same file, p90 (the p99 runs)", "false regression"),
    "slow-p90": ("+10% FLOPs head, p90 (the p99 runs)", "detected"),
}
def outliers(run):
    """Per case id (the model's .base/.head folded): the larger of the two
    sides' shares of runs beyond 1.3x their median."""
    f = run / "results.jsonl"
    if not f.exists():
        return {}
    worst = {}
    for line in f.read_text().splitlines():
        r = json.loads(line)
        s = r.get("samples_ms") or []
        if not s:
            continue
        m = statistics.median(s)
        share = sum(1 for x in s if x > 1.3 * m) / len(s)
        case = r["case"]["id"].replace("enc.base/", "enc/").replace("enc.head/", "enc/")
        worst[case] = max(worst.get(case, 0.0), share)
    return worst


targets = {
    f"{side}-{m}": ("<= 1/20" if side == "aa" else ">= 19/20")
    for side in ("aa", "slow")
    for m in ("p50", "p90", "p95", "p99", "p99k")
}
print("| set | runs | runs with a regression | target | case | regressed | improved | other verdicts | CI covers no change | median change | median CI half-width | outliers: median, max | runs with stalled rounds left out (share), runs where they were over 20% and all kept |")
print("|---|---:|---:|---|---|---:|---:|---|---:|---:|---:|---|---:|")
def spread(v):
    return f"{statistics.median(v) * 100:.2f}%, {max(v) * 100:.2f}%" if v else "-"


for name, (what, _) in sets.items():
    per_case = defaultdict(list)
    shares = defaultdict(list)
    any_reg = runs = 0
    for i in range(1, n + 1):
        f = out / f"{name}-{i}" / "ab.json"
        if not f.exists():
            continue
        runs += 1
        rows = json.loads(f.read_text())["rows"]
        any_reg += any(r["verdict"] == "regressed" for r in rows)
        for r in rows:
            per_case[r["id"]].append(r)
        # p90 and p95 are gated again on the p99 runs' samples.
        measured = out / f"{name.replace('-p90', '-p99').replace('-p95', '-p99').replace('-p99k', '-p99')}-{i}"
        for case, share in outliers(measured).items():
            shares[case].append(share)
    first = True
    for case in sorted(per_case):
        rs = per_case[case]
        verdicts = defaultdict(int)
        for r in rs:
            verdicts[r["verdict"]] += 1
        other = ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()) if k not in ("regressed", "improved"))
        changes = [r["ratio"] - 1 for r in rs if r.get("ratio")]
        covers = sum(1 for r in rs if r.get("ratio_ci95") and r["ratio_ci95"][0] <= 1 <= r["ratio_ci95"][1])
        half = [(r["ratio_ci95"][1] - r["ratio_ci95"][0]) / 2 for r in rs if r.get("ratio_ci95")]
        sr = [r["stalled_rounds"] for r in rs if r.get("stalled_rounds")]
        left = [x["stalled"] / x["rounds"] for x in sr if x["left_out"] and x["stalled"]]
        kept = sum(1 for x in sr if not x["left_out"])
        stalls = (
            f"{len(left)}/{len(rs)} (median {statistics.median(left) * 100:.0f}% of rounds), all kept in {kept}"
            if sr and left
            else (f"0/{len(rs)}, all kept in {kept}" if sr else "-")
        )
        print(
            f"| {name + ': ' + what if first else ''} | {runs if first else ''} | {any_reg if first else ''} | {targets[name] if first else ''} "
            f"| {case} | {verdicts['regressed']} | {verdicts['improved']} | {other or '-'} | {covers}/{len(rs)} "
            f"| {statistics.median(changes) * 100:+.1f}% | ±{statistics.median(half) * 100:.1f}% "
            f"| {spread(shares[case])} | {stalls} |"
        )
        first = False
