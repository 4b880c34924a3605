"""Our methods and kvpress's presses on exactly the same samples, as one Markdown table.

    python benchmarks/peers/side_by_side.py results/smollm2/results.json results/smollm2/peers.json [more.json ...]

Several peers files (e.g. runs of different presses on the same samples) are read as one: a press is taken from the
first file that has it, and the full cache from the first file. Only samples that both sides scored are used
(kvpress runs are usually smaller: ``--limit``); each cell is the mean over tasks of the per-task mean score,
computed as the evaluation's own summary (``summary[...]["average"]``). With ``--data`` (the JSONL both ran on), every
prediction on both sides is scored again with the current metrics, so files written under older metric rules
compare fairly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from polykv_learn.data.jsonl import load_samples  # noqa: E402
from polykv_learn.eval.metrics import score  # noqa: E402
from polykv_learn.eval.results import _table  # noqa: E402


def combine_peers(parts: list[dict]) -> dict:
    """One peers result from several: each method from the first part that ran it; budgets common to all parts."""
    owner: dict[str, int] = {}
    for i, part in enumerate(parts):
        for r in part["samples"]:
            owner.setdefault(r["method"], i)
    samples = [r for i, part in enumerate(parts) for r in part["samples"] if owner[r["method"]] == i]
    budgets = [b for b in parts[0]["config"]["budgets"] if all(b in q["config"]["budgets"] for q in parts)]
    return {"config": {**parts[0]["config"], "budgets": budgets}, "samples": samples}


def rescore(record: dict, by_id: dict[str, dict]) -> float:
    if record["id"] not in by_id:
        raise SystemExit(f"sample {record['id']!r} is not in --data")
    sample = by_id[record["id"]]
    return score(sample["metric"], record["prediction"], sample["answers"], all_classes=sample.get("all_classes"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ours", help="results.json of polykv-learn evaluate")
    p.add_argument("peers", nargs="+", help="peers.json file(s) of benchmarks/peers/run_kvpress.py")
    p.add_argument("--data", default=None, help="the JSONL both ran on: rescore every prediction with it")
    args = p.parse_args(argv)
    ours = json.loads(Path(args.ours).read_text())
    peers = combine_peers([json.loads(Path(f).read_text()) for f in args.peers])
    ids = {r["id"] for r in ours["samples"]} & {r["id"] for r in peers["samples"]}
    if not ids:
        raise SystemExit("ours and the peers share no sample id")
    budgets = [int(b) for b in ours["config"]["budgets"] if b in peers["config"]["budgets"]]
    tasks = sorted({r["task"] for r in ours["samples"] if r["id"] in ids})
    by_id = {s["id"]: s for s in load_samples(args.data)} if args.data else None
    tables = []
    for label, result in (("ours", ours), ("kvpress", peers)):
        records = [r for r in result["samples"] if r["id"] in ids]
        if by_id is not None:
            records = [{**r, "score": rescore(r, by_id)} for r in records]
        methods = list(dict.fromkeys(r["method"] for r in records))
        tables.append((label, _table(records, "score", methods, budgets, tasks)))
    print(f"{len(ids)} shared samples ({', '.join(tasks)}); score = mean over tasks\n")
    print("| method | " + " | ".join(f"B={b}" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for label, table in tables:
        for method, per_budget in table.items():
            cells = [per_budget[str(b)]["average"] for b in budgets]
            print(f"| {label}: {method} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
