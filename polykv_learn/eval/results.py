"""What the evaluation's records add up to: sample selection and sharding, summaries, gap recovery, and joining
runs (:func:`merge_results` for disjoint samples, :func:`replace_methods` for re-evaluated methods).

A *record* is one sample x method x budget (``id``, ``task``, ``method``, ``budget``, ``prediction``, ``score``,
``nll``, ``kl``, ``context_tokens``, ``kept``, ``kv_bytes``, and the needle fields of
:mod:`~polykv_learn.eval.retention`: ``needle_tokens``, ``needle_retention``, ``needle_retention_layers``); every
summary is recomputed from the records, so runs joined from parts give the tables of one run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from polykv_learn.data.tasks import TEST_ONLY_TASKS
from polykv_learn.eval.methods import LEARNED_METHODS
from polykv_learn.eval.metrics import gap_recovery

__all__ = [
    "MEANINGFUL_FULL_SCORE",
    "build_results",
    "gap_recovery_table",
    "merge_results",
    "needle_summary",
    "replace_methods",
    "select_samples",
]

#: a task counts as *scored* when the full cache averages at least this score on it: below, the model cannot do
#: the task even uncompressed, and its score differences between methods are noise (the issue's "keep only task
#: types on which the full-cache model scores meaningfully"); every task is still reported
MEANINGFUL_FULL_SCORE = 0.1


def select_samples(
    samples: Sequence[dict[str, Any]],
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[dict[str, Any]]:
    """Samples of the given tasks (all when None), at most ``limit`` per task, in file order; with ``shard=(i, k)``
    only every k-th of those per task, starting at the i-th (k disjoint shards that together are the selection,
    for parallel runs that :func:`merge_results` joins)."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be I/K with K >= 1 and 0 <= I < K, got {index}/{count}")
    if tasks is not None:
        present = {s["task"] for s in samples}
        unknown = [t for t in tasks if t not in present]
        if unknown:
            raise ValueError(f"task(s) {', '.join(map(repr, unknown))} not in the data; present: {sorted(present)}")
    counts: dict[str, int] = {}
    chosen = []
    for s in samples:
        if tasks is not None and s["task"] not in tasks:
            continue
        seen = counts.get(s["task"], 0)
        if limit is not None and seen >= limit:
            continue
        counts[s["task"]] = seen + 1
        if seen % count == index:
            chosen.append(s)
    return chosen


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs of the same configuration on disjoint samples (e.g. one process per task,
    which bounds each process's memory and lets a long evaluation resume from the parts already done): the
    summaries, gap recovery and tables are recomputed from the union of the per-sample records."""
    if not parts:
        raise ValueError("nothing to merge")
    cfg = parts[0]["config"]
    same = ("protocol", "budgets", "methods", "chat", "max_context", "model", "capture")
    for i, part in enumerate(parts[1:], 1):
        differ = [k for k in same if part["config"].get(k) != cfg.get(k)]
        if differ:
            raise ValueError(f"run {i} differs from run 0 in {', '.join(differ)}; only runs of one configuration merge")
    records = [r for part in parts for r in part["samples"]]
    keys = [(r["id"], r["method"], r["budget"]) for r in records]
    if len(set(keys)) != len(keys):
        raise ValueError("the runs share samples (same id, method and budget); merge runs on disjoint samples")
    results = build_results(records, cfg["methods"], parts[0]["single_policies"], cfg["budgets"])
    tasks = sorted({t for part in parts for t in part["tasks"]})  # the tasks each run evaluated
    per_run = ("tasks", "shard")  # what differs between the parts
    shared = {k: v for k, v in cfg.items() if k not in per_run}
    results["config"] = {**shared, "tasks": tasks, "merged_runs": len(parts)}
    example_plans: dict[str, dict[str, Any]] = {}
    for part in parts:
        for method, per_budget in part.get("example_plans", {}).items():
            for budget, plan in per_budget.items():
                example_plans.setdefault(method, {}).setdefault(budget, plan)
    results["example_plans"] = example_plans
    samples = sum(p["timing"]["samples"] for p in parts)
    seconds = sum(p["timing"]["seconds"] for p in parts)
    results["timing"] = {"samples": samples, "seconds": seconds, "seconds_per_sample": seconds / samples}
    return results


def replace_methods(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the methods ``update`` evaluated (other than ``full``) taken from ``update``: e.g. a retrained
    router re-evaluated with ``--methods polykv polykv-static`` on the same samples, the baselines reused. Both runs
    must share the configuration and the samples, and their full-cache records must agree (same predictions and
    scores, NLL to 1e-4): the proof that the two runs are comparable."""
    cfg, ucfg = base["config"], update["config"]
    same = ("protocol", "budgets", "chat", "max_context", "model", "capture")
    differ = [k for k in same if ucfg.get(k) != cfg.get(k)]
    if differ:
        raise ValueError(f"the runs differ in {', '.join(differ)}; only runs of one configuration combine")
    full = {r["id"]: r for r in base["samples"] if r["method"] == "full"}
    ufull = {r["id"]: r for r in update["samples"] if r["method"] == "full"}
    if full.keys() != ufull.keys():
        raise ValueError(
            f"the runs evaluated different samples ({len(full)} and {len(ufull)}, {len(full.keys() ^ ufull.keys())} "
            "not in both); re-evaluate the same --data, --tasks and --limit"
        )
    for sid, r in full.items():
        u = ufull[sid]
        if (r["prediction"], r["score"]) != (u["prediction"], u["score"]) or not math.isclose(
            r["nll"], u["nll"], rel_tol=1e-4, abs_tol=1e-5
        ):
            raise ValueError(f"sample {sid!r}: the full cache gives different results in the two runs; not comparable")
    replaced = [m for m in ucfg["methods"] if m != "full"]
    methods = list(cfg["methods"]) + [m for m in replaced if m not in cfg["methods"]]
    records = [r for r in base["samples"] if r["method"] not in replaced]
    records += [r for r in update["samples"] if r["method"] in replaced]
    results = build_results(records, methods, base["single_policies"], cfg["budgets"])
    results["config"] = {**cfg, "methods": methods, "replaced_methods": replaced, "replaced_from": ucfg}
    for key in ("router", "gbdt_router"):
        if ucfg.get(key) is not None:
            results["config"][key] = ucfg[key]
    results["example_plans"] = {
        **{m: p for m, p in base.get("example_plans", {}).items() if m not in replaced},
        **{m: p for m, p in update.get("example_plans", {}).items() if m in replaced},
    }
    results["timing"] = dict(base["timing"])  # a run of every method (the update ran only some)
    return results


def _mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def _table(records: list[dict[str, Any]], key: str, methods: Sequence[str], budgets: Sequence[int], tasks: list[str]):
    """method -> str(budget) -> task -> mean of ``key``, plus "average" (mean over tasks); ``full`` is
    replicated under every budget."""
    groups: dict[tuple[str, int | None, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"], r["task"]), []).append(r[key])
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for method in methods:
        table[method] = {}
        for budget in budgets:
            b = None if method == "full" else budget
            row = {t: _mean(groups.get((method, b, t), [])) for t in tasks}
            row["average"] = _mean(row[t] for t in tasks)
            table[method][str(budget)] = row
    return table


def gap_recovery_table(
    summary: dict[str, dict[str, dict[str, float | None]]],
    singles: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method (every method that is neither ``full`` nor a single policy) and budget: its score, the best
    single policy at that budget (by score, on ``tasks``; all tasks' "average" when None; ties: the first in
    ``singles``), the full cache, and ``gap_recovery = (score - best single) / (full - best single)``, which is
    None when the full cache does not score above the best single policy (there is no gap to recover)."""

    def avg(method: str, budget: int) -> float | None:
        row = summary[method][str(budget)]
        if tasks is None:
            return row["average"]
        return _mean(row[t] for t in tasks)

    table: dict[str, dict[str, dict[str, Any]]] = {}
    present_singles = [s for s in singles if s in summary]
    targets = [m for m in summary if m != "full" and m not in singles and m != "random"]
    if not present_singles or "full" not in summary:
        return table
    for method in targets:
        table[method] = {}
        for budget in budgets:
            scored = [(avg(s, budget), s) for s in present_singles if avg(s, budget) is not None]
            best_score, best = max(scored, key=lambda x: x[0]) if scored else (None, None)  # ties: first
            learned, full = avg(method, budget), avg("full", budget)
            no_gap = full is not None and best_score is not None and full <= best_score
            table[method][str(budget)] = {
                "score": learned,
                "best_single": best,
                "best_single_score": best_score,
                "full": full,
                # undefined when the full cache does not beat the best single policy (no gap to recover)
                "gap_recovery": None if no_gap else gap_recovery(learned, best_score, full),
            }
    return table


def needle_summary(
    records: list[dict[str, Any]], methods: Sequence[str], budgets: Sequence[int], tasks: list[str]
) -> dict[str, Any]:
    """Needle retention from the records (:mod:`~polykv_learn.eval.retention`): which samples have a needle (the
    first gold answer in the context) and which are excluded, per task; per method, budget and task the mean
    retention over the samples with a needle ("average": the mean over tasks); per method and budget the mean
    over those samples of each layer's retention. Records without the needle fields (older runs) count as
    excluded."""
    tokens: dict[str, tuple[str, int]] = {}
    for r in records:
        tokens.setdefault(r["id"], (r["task"], int(r.get("needle_tokens") or 0)))
    with_needle = [r for r in records if r.get("needle_retention") is not None]
    included = {t: sorted(i for i, (tt, k) in tokens.items() if tt == t and k > 0) for t in tasks}
    excluded = {t: sorted(i for i, (tt, k) in tokens.items() if tt == t and k == 0) for t in tasks}
    counts = {
        "samples": sum(map(len, included.values())),
        "excluded": sum(map(len, excluded.values())),
        "samples_by_task": {t: len(v) for t, v in included.items()},
        "excluded_by_task": {t: len(v) for t, v in excluded.items()},
        "excluded_ids": sorted(i for v in excluded.values() for i in v),
    }
    if not with_needle:
        return {**counts, "summary": {}, "layers": {}}
    layer_groups: dict[tuple[str, int | None], list[list[float]]] = {}
    for r in with_needle:
        layer_groups.setdefault((r["method"], r["budget"]), []).append(r["needle_retention_layers"])
    layers: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        layers[method] = {}
        for budget in budgets:
            rows = layer_groups.get((method, None if method == "full" else budget), [])
            if rows:
                layers[method][str(budget)] = [statistics.fmean(col) for col in zip(*rows, strict=True)]
    return {**counts, "summary": _table(with_needle, "needle_retention", methods, budgets, tasks), "layers": layers}


def build_results(
    records: list[dict[str, Any]], methods: Sequence[str], singles: Sequence[str], budgets: Sequence[int]
) -> dict[str, Any]:
    tasks = sorted({r["task"] for r in records})
    test_only = [t for t in tasks if t in TEST_ONLY_TASKS]
    summary = _table(records, "score", methods, budgets, tasks)
    full_cache = dict(summary["full"][str(budgets[0])])
    scored = [t for t in tasks if (full_cache.get(t) or 0.0) >= MEANINGFUL_FULL_SCORE]
    scored_test_only = [t for t in scored if t in TEST_ONLY_TASKS]
    return {
        "tasks": tasks,
        "test_only_tasks": test_only,
        "scored_tasks": scored,
        "scored_test_only_tasks": scored_test_only,
        "meaningful_full_score": MEANINGFUL_FULL_SCORE,
        "single_policies": list(singles),
        "learned_methods": [m for m in methods if m in LEARNED_METHODS],
        "summary": summary,
        "summary_nll": _table(records, "nll", methods, budgets, tasks),
        "summary_kl": _table(records, "kl", methods, budgets, tasks),
        "needle_retention": needle_summary(records, methods, budgets, tasks),
        "full_cache": full_cache,
        "gap_recovery": gap_recovery_table(summary, singles, budgets),
        "gap_recovery_test_only": gap_recovery_table(summary, singles, budgets, test_only) if test_only else {},
        "gap_recovery_scored": gap_recovery_table(summary, singles, budgets, scored) if scored else {},
        "gap_recovery_scored_test_only": (
            gap_recovery_table(summary, singles, budgets, scored_test_only) if scored_test_only else {}
        ),
        "samples": records,
    }
