#!/usr/bin/env python3
"""How a worker process's speed depends on when it started in its group.

    python3 scripts/start_order.py RUN_DIR/results.jsonl [...]

For every case measured on several processes: each process's median block
(`rounds.block_medians_ms` split by `rounds.process`), relative to the
geometric mean of its case's processes, by the process's place in its
group's start order (in tenths of the group's starts), and the same for
the first process of each group. The start orders are recomputed from
`rounds.order_seed` as handoff-runner's `start_strata` draws them (keep
the two in step; runs made before the strata were balanced drew them
otherwise). A group's records must be in the runner's case order, as
results.jsonl writes them.
"""
import json
import math
import statistics
import sys

MASK = (1 << 64) - 1


class SplitMix64:
    """handoff-runner's RoundOrder: SplitMix64 and Fisher-Yates."""

    def __init__(self, seed):
        self.state = seed

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def shuffle(self, n):
        v = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.next() % (i + 1)
            v[i], v[j] = v[j], v[i]
        return v


def start_strata(cases, per_case, seed):
    """Each stratum's start order, as case indices."""
    draw = SplitMix64(seed ^ 0x5747415254000000)
    labels = draw.shuffle(cases)
    rows = []  # each row: the place of every case (by design index)
    if per_case % 2 == 1:
        rows.append(list(range(cases)))
        if per_case >= 3:
            half = [(c + cases // 2) % cases for c in range(cases)]
            by_sum = sorted(range(cases), key=lambda c: -(c + half[c]))
            last = [0] * cases
            for place, c in enumerate(by_sum):
                last[c] = place
            rows += [half, last]
    while len(rows) < per_case:
        places = draw.shuffle(cases)
        rows += [places, [cases - 1 - p for p in places]]
    orders = []
    for places in rows[:per_case]:
        order = [0] * cases
        for c, place in enumerate(places):
            order[place] = labels[c]
        orders.append(order)
    return orders


def process_medians(rounds):
    by_process = {}
    for m, k in zip(rounds["block_medians_ms"], rounds["process"]):
        if m:
            by_process.setdefault(k, []).append(m)
    return [statistics.median(by_process[k]) if k in by_process else None
            for k in range(rounds["processes"])]


def main(paths):
    by_tenth, firsts = {}, []
    for path in paths:
        groups = {}
        for line in open(path):
            r = json.loads(line)
            rounds = r.get("rounds")
            if rounds and rounds.get("processes", 1) > 1:
                groups.setdefault(rounds["group"], []).append(r)
        for records in groups.values():
            n, p = len(records), records[0]["rounds"]["processes"]
            start = {}
            for k, order in enumerate(start_strata(n, p, records[0]["rounds"]["order_seed"])):
                for c in order:
                    start[(c, k)] = len(start)
            for c, r in enumerate(records):
                medians = process_medians(r["rounds"])
                if None in medians:
                    continue
                centre = math.exp(sum(math.log(x) for x in medians) / p)
                for k, m in enumerate(medians):
                    rel = (m / centre - 1) * 100
                    place = start[(c, k)]
                    by_tenth.setdefault(place * 10 // (n * p), []).append(rel)
                    if place == 0:
                        firsts.append(rel)
    if not by_tenth:
        sys.exit("no case with more than one process in " + " ".join(paths))
    print("| starts (tenth of the group's) | processes | median | mean | slower than their case |")
    print("|---:|---:|---:|---:|---:|")
    for tenth in sorted(by_tenth):
        v = by_tenth[tenth]
        print(f"| {tenth + 1} | {len(v)} | {statistics.median(v):+.2f}% | "
              f"{statistics.mean(v):+.2f}% | {sum(x > 0 for x in v)} |")
    print(f"\nFirst process of each group: {len(firsts)} groups, median "
          f"{statistics.median(firsts):+.2f}%, slower than its case in "
          f"{sum(x > 0 for x in firsts)}")


if __name__ == "__main__":
    main(sys.argv[1:])
