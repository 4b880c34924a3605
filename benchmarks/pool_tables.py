"""Markdown tables of an evaluation's ``results.json`` for the policy-pool comparison (issues #17 and #19): per
budget the best single policy and chosen methods with their gap recovery, and the needle retention of every method.

    python benchmarks/pool_tables.py results/smollm2-heldout/pool-query-agnostic/results.json
    python benchmarks/pool_tables.py RESULTS.json --tasks passkey   # the scores of some task types only

Gap recovery is ``(method - best single) / (full - best single)`` with the best single policy chosen per budget on
the same tasks (:func:`polykv_learn.eval.results.gap_recovery_table`); "–" where the full cache does not score above
the best single policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polykv_learn.eval.results import gap_recovery_table  # noqa: E402

METHODS = ("kvzip", "kvzip-global", "keydiff", "adakv", "adakv-global", "polykv", "polykv-heads")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.0f}%"


def score_table(results: dict, tasks: list[str] | None, methods: tuple[str, ...] = METHODS) -> list[str]:
    """Rows: the best single policy of the pool without ``methods`` (the baseline of every gap recovery), the best
    with them, then each method (score and gap recovery), one column per budget."""
    budgets = [str(b) for b in results["config"]["budgets"]]
    summary = dict(results["summary"])
    singles = [s for s in results["single_policies"] if s not in methods]  # a method listed is not its own baseline
    table = gap_recovery_table(summary, singles, [int(b) for b in budgets], tasks)
    if not table:
        raise SystemExit(
            "these results hold no full cache or no single policy outside the listed methods to compare with; "
            "merge them into a pool run first (polykv-learn evaluate --merge BASE NEW --replace --out DIR)"
        )
    lines = ["| method | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    first = next(iter(table.values()))
    lines.append(
        "| best single | "
        + " | ".join(f"{_fmt(first[b]['best_single_score'])} ({first[b]['best_single']})" for b in budgets)
        + " |"
    )
    every = gap_recovery_table(summary, results["single_policies"], [int(b) for b in budgets], tasks)
    ref = next(iter(every.values()))
    lines.append(
        "| best single, new policies included | "
        + " | ".join(f"{_fmt(ref[b]['best_single_score'])} ({ref[b]['best_single']})" for b in budgets)
        + " |"
    )
    for m in methods:
        if m in table:
            cells = [f"{_fmt(table[m][b]['score'])} ({_pct(table[m][b]['gap_recovery'])})" for b in budgets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(f"| full | {_fmt(first[budgets[0]]['full'])} | " + " | ".join("" for _ in budgets[1:]) + " |")
    return lines


def retention_table(results: dict, task: str = "average") -> list[str]:
    needle = results["needle_retention"]
    budgets = [str(b) for b in results["config"]["budgets"]]
    lines = ["| method | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for m, row in needle["summary"].items():
        if m != "full":
            lines.append(f"| {m} | " + " | ".join(_fmt(row[b][task]) for b in budgets) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="an evaluation's results.json")
    ap.add_argument("--tasks", nargs="+", default=None, help="score these task types only (default: all)")
    args = ap.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    if "needle_retention" not in results:
        raise SystemExit(f"{args.results} has no needle retention (evaluated before it existed)")
    cfg = results["config"]
    print(f"{cfg.get('protocol')}, {results['timing']['samples']} samples, tasks {args.tasks or results['tasks']}\n")
    # the pool methods are not baselines of each other here: the policies of the pool minus those listed
    print("\n".join(score_table(results, args.tasks)))
    needle = results["needle_retention"]
    print(
        f"\nneedle retention, {needle['samples']} samples ({needle['samples_by_task']}), "
        f"{needle['excluded']} excluded\n"
    )
    print("\n".join(retention_table(results)))
    for task, count in needle["samples_by_task"].items():
        if count:
            print(f"\nneedle retention, {task} ({count} samples)\n")
            print("\n".join(retention_table(results, task)))


if __name__ == "__main__":
    main()
