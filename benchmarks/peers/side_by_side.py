"""Our methods and kvpress's presses on exactly the same samples, as one Markdown table.

    python benchmarks/peers/side_by_side.py results/smollm2/results.json results/smollm2/peers.json

Only samples that both files scored are used (kvpress runs are usually smaller: ``--limit``); each cell is the mean
over those samples of the per-sample score (mean over tasks of the per-task means, like ``summary[...]["average"]``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

OURS = ("full", "snapkv", "streaming", "tova", "knorm", "expected_attention", "h2o", "pyramid", "cake", "polykv")


def task_average(records: list[dict], ids: set[str]) -> dict[tuple[str, int | None], float]:
    """(method, budget) -> mean over tasks of the per-task mean score, on the samples ``ids``."""
    by: dict[tuple[str, int | None, str], list[float]] = defaultdict(list)
    for r in records:
        if r["id"] in ids:
            by[(r["method"], r["budget"], r["task"])].append(r["score"])
    per_task: dict[tuple[str, int | None], list[float]] = defaultdict(list)
    for (method, budget, _), scores in by.items():
        per_task[(method, budget)].append(statistics.fmean(scores))
    return {k: statistics.fmean(v) for k, v in per_task.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ours", help="results.json of polykv-learn evaluate")
    p.add_argument("peers", help="peers.json of benchmarks/peers/run_kvpress.py")
    args = p.parse_args(argv)
    ours, peers = json.load(open(args.ours)), json.load(open(args.peers))
    ids = {r["id"] for r in ours["samples"]} & {r["id"] for r in peers["samples"]}
    if not ids:
        raise SystemExit("the two files share no sample id")
    budgets = [int(b) for b in ours["config"]["budgets"] if b in peers["config"]["budgets"]]
    a, b = task_average(ours["samples"], ids), task_average(peers["samples"], ids)
    tasks = sorted({r["task"] for r in ours["samples"] if r["id"] in ids})
    print(f"{len(ids)} shared samples ({', '.join(tasks)}); score = mean over tasks\n")
    print("| method | " + " | ".join(f"B={x}" for x in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    rows = [("ours: " + m, a, m) for m in OURS if (m, budgets[0]) in a or (m, None) in a]
    rows += [("kvpress: " + m, b, m) for m in dict.fromkeys(r["method"] for r in peers["samples"])]
    for label, table, m in rows:
        cells = [table.get((m, x), table.get((m, None))) for x in budgets]
        print(f"| {label} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
