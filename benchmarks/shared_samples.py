"""Two evaluation runs side by side on the samples they share: per method and budget, the mean score, needle
retention and KL to the full cache of each run, over the same sample ids (e.g. one method scored two ways).

    python benchmarks/shared_samples.py results/smollm2-heldout/pool-query-agnostic/results.json \
        results/smollm2-heldout/kvzip-chunk-query-agnostic/results.json --methods kvzip kvzip-global
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def means(records: list[dict], ids: set[str], methods: list[str]) -> dict[tuple[str, int], tuple[float, ...]]:
    """(method, budget) -> (mean score, mean needle retention, mean KL, samples) over the records of ``ids``."""
    rows = defaultdict(list)
    for r in records:
        if r["id"] in ids and r["method"] in methods and r["budget"] is not None:
            rows[(r["method"], r["budget"])].append(r)
    out = {}
    for key, rs in rows.items():
        kept = [r["needle_retention"] for r in rs if r.get("needle_retention") is not None]
        n = len(rs)
        retention = sum(kept) / len(kept) if kept else float("nan")
        out[key] = (sum(r["score"] for r in rs) / n, retention, sum(r["kl"] for r in rs) / n, n)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", help="an evaluation's results.json")
    ap.add_argument("second", help="another evaluation's results.json")
    ap.add_argument("--methods", nargs="+", required=True, help="methods to compare (each in both runs)")
    args = ap.parse_args(argv)
    runs = [json.loads(Path(p).read_text())["samples"] for p in (args.first, args.second)]
    ids = {r["id"] for r in runs[0]} & {r["id"] for r in runs[1]}
    if not ids:
        raise SystemExit(f"{args.first} and {args.second} share no sample id")
    a, b = (means(run, ids, args.methods) for run in runs)
    missing = sorted(set(args.methods) - ({m for m, _ in a} & {m for m, _ in b}))
    if missing:
        raise SystemExit(f"methods not in both runs: {missing}")
    print(f"{len(ids)} shared samples; first = {args.first}, second = {args.second}\n")
    print("| method | B | score (first / second) | needle retention | KL to full |")
    print("|---|---:|---|---|---|")
    for key in sorted(a, key=lambda k: (args.methods.index(k[0]), k[1])):
        x, y = a[key], b.get(key)
        if y is None:
            continue
        print(f"| {key[0]} | {key[1]} | {x[0]:.3f} / {y[0]:.3f} | {x[1]:.3f} / {y[1]:.3f} | {x[2]:.3f} / {y[2]:.3f} |")


if __name__ == "__main__":
    main()
