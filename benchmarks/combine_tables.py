"""One score and gap-recovery table from evaluation runs that cover different task types or methods of one sample
set (``evaluate --merge`` needs one configuration; this reads each run's per-task means instead).

    python benchmarks/combine_tables.py results/smollm2-heldout/merged-calibrated-query-agnostic \
        results/smollm2-heldout/kvzip-alloc-query-agnostic results/smollm2-heldout/kvzip-alloc-code-query-agnostic \
        --rename polykv=polykv-kvzip polykv-heads=polykv-kvzip-heads

A method's score on a task comes from the last run (in argument order) that has it; ``--rename`` applies to every
run after the first, so a retrained router's ``polykv`` does not overwrite the first run's. Runs that share a task
must agree on its full-cache score (the same samples), or the script stops. Gap recovery is on the first run's
scored tasks (full cache above its meaningful score), against the best single policy of every run's pool
(:func:`polykv_learn.eval.results.gap_recovery_table`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polykv_learn.eval.results import gap_recovery_table  # noqa: E402


def combine(runs: list[dict], rename: dict[str, str]) -> tuple[dict, list[str], list[str]]:
    """(summary method -> budget -> task -> mean score, single policies, tasks) of the runs together."""
    summary: dict = {}
    singles: list[str] = []
    tasks: list[str] = []
    for i, run in enumerate(runs):
        for task in run["tasks"]:
            if task not in tasks:
                tasks.append(task)
        singles += [s for s in run["single_policies"] if s not in singles]
        for method, rows in run["summary"].items():
            name = rename.get(method, method) if i else method
            for budget, row in rows.items():
                merged = summary.setdefault(name, {}).setdefault(budget, {})
                for task, value in row.items():
                    if task == "average":
                        continue
                    if name == "full" and task in merged and abs(merged[task] - value) > 1e-9:
                        raise SystemExit(f"run {i}: full-cache score on {task} differs ({value} vs {merged[task]})")
                    merged[task] = value
    partial = [m for m, rows in summary.items() if any(t not in row for row in rows.values() for t in tasks)]
    for method in partial:  # a method some task type was not run with has no comparable mean
        del summary[method]
    if partial:
        print(f"left out (not run on every task type): {', '.join(partial)}")
    for rows in summary.values():
        for row in rows.values():
            row["average"] = sum(row[t] for t in tasks) / len(tasks)
    return summary, [s for s in singles if s in summary], tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="evaluation output folders (or their results.json)")
    ap.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW", help="method renames for runs 2..")
    args = ap.parse_args()
    runs = [json.loads((Path(r) / "results.json" if Path(r).is_dir() else Path(r)).read_text()) for r in args.runs]
    rename = dict(item.split("=", 1) for item in args.rename)
    summary, singles, tasks = combine(runs, rename)
    budgets = [int(b) for b in runs[0]["config"]["budgets"]]
    scored = runs[0]["scored_tasks"]
    table = gap_recovery_table(summary, singles, budgets, scored)
    print(f"tasks: {', '.join(tasks)}; scored (gap recovery): {', '.join(scored)}")
    print("| method | " + " | ".join(f"B={b}" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for method in ["full", *singles, *table]:
        cells = []
        for b in budgets:
            score = summary[method][str(b)]["average"]
            gap = table.get(method, {}).get(str(b), {}).get("gap_recovery")
            cells.append(f"{score:.3f}" + ("" if gap is None else f" ({100 * gap:+.0f}%)"))
        print(f"| {method} | " + " | ".join(cells) + " |")
    if not table:
        raise SystemExit("no method besides the full cache and single policies was run on every task type")
    any_method = next(iter(table.values()))
    print("| *best single (scored)* | " + " | ".join(f"{any_method[str(b)]['best_single']}" for b in budgets) + " |")


if __name__ == "__main__":
    main()
