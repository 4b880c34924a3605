"""benchmarks/combine_tables.py: runs over different task types of one sample set give one table whose means and gap
recovery are those of the per-task scores; a method missing a task is left out; runs whose full cache differs on a
shared task are refused."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "combine_tables.py"
spec = importlib.util.spec_from_file_location("combine_tables", SCRIPT)
combine_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(combine_tables)


def run(tasks, scores):
    """A results.json-like run: ``scores`` method -> task -> score at the one budget 128."""
    return {
        "tasks": tasks,
        "single_policies": [m for m in scores if m not in ("full", "polykv")],
        "summary": {m: {"128": dict(row)} for m, row in scores.items()},
    }


def test_runs_over_different_tasks_combine_into_per_task_means():
    base = run(["a", "b"], {"full": {"a": 1.0, "b": 0.5}, "snapkv": {"a": 0.2, "b": 0.1},
                            "polykv": {"a": 0.4, "b": 0.1}, "cake": {"a": 0.3, "b": 0.0}})  # fmt: skip
    retrained = run(["a", "b"], {"full": {"a": 1.0, "b": 0.5}, "polykv": {"a": 0.4, "b": 0.1}})
    other_task = run(["c"], {"full": {"c": 0.8}, "snapkv": {"c": 0.0}, "polykv": {"c": 0.6}})
    summary, singles, tasks = combine_tables.combine([base, retrained, other_task], {"polykv": "polykv-new"})
    assert tasks == ["a", "b", "c"] and singles == ["snapkv"]
    assert "cake" not in summary and "polykv" not in summary  # each lacks task c (the renamed runs' is polykv-new)
    assert summary["polykv-new"]["128"] == {"a": 0.4, "b": 0.1, "c": 0.6, "average": pytest.approx(1.1 / 3)}
    assert summary["snapkv"]["128"]["average"] == pytest.approx(0.1)
    assert summary["full"]["128"]["average"] == pytest.approx(2.3 / 3)


def test_runs_whose_full_cache_differs_on_a_shared_task_are_refused():
    base = run(["a"], {"full": {"a": 1.0}, "snapkv": {"a": 0.2}})
    other = run(["a"], {"full": {"a": 0.9}, "snapkv": {"a": 0.1}})
    with pytest.raises(SystemExit, match=r"^run 1: full-cache score on a differs \(0.9 vs 1.0\)$"):
        combine_tables.combine([base, other], {})
