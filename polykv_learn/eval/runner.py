"""The evaluation sweep: every sample through the :class:`~polykv_learn.eval.evaluator.Evaluator`, each finished
sample appended to ``OUT/samples.jsonl`` (:mod:`~polykv_learn.eval.samples_log`), then the results rebuilt from
every sample's records and written (:mod:`~polykv_learn.eval.report`).

The parts of ``eval/``: ``evaluator.py`` (one sample: shared prefill, forks, batched decoding), ``fork_batch.py``
(the forks' batch cache), ``methods.py`` (the methods' plans), ``metrics.py`` (scores), ``results.py``
(selection, summaries, gap recovery, merging), ``report.py`` (``results.json``, ``results.md``, plots),
``samples_log.py`` (the per-sample log ``--resume`` continues), ``checks.py`` (input checks before the model
loads), ``memory.py`` (freed heap returned to the OS), ``jsonl.py`` (the sample files), ``cli.py`` (the command).

A run that is stopped (killed, interrupted, a failing sample) keeps every sample it finished in
``samples.jsonl``; :func:`run_evaluation` with ``resume=True`` skips them and rebuilds the same results an
uninterrupted run gives (only the wall-time fields differ).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from polykv_learn.capture import CaptureOptions, scope_fields
from polykv_learn.eval.evaluator import EvalSettings, Evaluator, SampleResult
from polykv_learn.eval.memory import release_free_memory
from polykv_learn.eval.methods import Method
from polykv_learn.eval.report import write_outputs
from polykv_learn.eval.results import build_results
from polykv_learn.eval.samples_log import FORMAT, SamplesLog, digest

__all__ = ["run_config", "run_evaluation", "run_header", "results_from_entries", "sample_entry"]


def run_config(
    config: dict[str, Any] | None, settings: EvalSettings, methods: Sequence[Method], capture: CaptureOptions
) -> dict[str, Any]:
    """``results.json``'s ``config`` but ``model`` (the loaded model's name): the caller's ``config`` (data,
    router, ...), then the protocol, budgets, methods, chat, ``max_context`` and capture window."""
    return {
        **(config or {}),
        "protocol": settings.protocol,
        "budgets": list(settings.budgets),
        "methods": [m.name for m in methods],
        "chat": settings.chat,
        "max_context": settings.max_context,
        # the chunk scope's keys only (runs made before it, all "full", keep their config: resumable, mergeable)
        "capture": {"window": capture.window, "future": capture.future, **scope_fields(capture)},
    }


def run_header(
    config: dict[str, Any],
    settings: EvalSettings,
    samples: Sequence[dict[str, Any]],
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The first line of ``samples.jsonl``: what a resumed run must share (``config`` from :func:`run_config`;
    the batch settings, a digest of the selected samples, and the caller's ``fingerprint``, e.g. artifact digests)."""
    return {
        "polykv_evaluate_samples": FORMAT,
        "config": config,
        "fingerprint": {
            "batch_size": settings.batch_size,
            "group_size": settings.group_size,
            "stop_when_settled": settings.stop_when_settled,
            "samples": digest(list(samples)),
            **(fingerprint or {}),
        },
    }


def sample_entry(sample: dict[str, Any], result: SampleResult) -> dict[str, Any]:
    """One line of ``samples.jsonl``: the sample's records, and per method the plans that may serve as the
    report's example plans (those that evict: a plan and a context longer than the budget)."""
    plans: dict[str, dict[str, Any]] = {}
    for method, per_budget in result.plans.items():
        slot = plans[method] = {}
        for budget, plan in per_budget.items():
            if plan is not None and result.context_tokens > budget:
                slot[str(budget)] = {"sample": sample["id"], "context_tokens": result.context_tokens, **plan.to_dict()}
    return {
        "id": sample["id"],
        "context_tokens": result.context_tokens,
        "seconds": result.seconds,
        "records": result.records,
        "plans": plans,
    }


def results_from_entries(entries: Sequence[dict[str, Any]], evaluator: Evaluator, config: dict[str, Any]):
    """The results of a run from its samples' entries in sample order: summaries from every record, the first
    evicting plan per method and budget as its example, the summed per-sample times."""
    records = [r for e in entries for r in e["records"]]
    methods = [m.name for m in evaluator.methods]
    singles = [m.name for m in evaluator.methods if m.kind == "single" and not m.name == "random"]
    results = build_results(records, methods, singles, evaluator.settings.budgets)
    results["config"] = {**config, "model": evaluator.dims.name}
    heads = {m.name: m.head_allocation for m in evaluator.methods if m.head_allocation}
    if heads:  # polykv-heads: the router's learned head allocator or AdaKV's split
        results["config"]["head_allocation"] = heads
    example_plans: dict[str, dict[str, Any]] = {}
    for entry in entries:
        for method, per_budget in entry["plans"].items():
            slot = example_plans.setdefault(method, {})
            for budget, plan in per_budget.items():
                slot.setdefault(budget, plan)
    results["example_plans"] = example_plans
    seconds = [e["seconds"] for e in entries]
    results["timing"] = {
        "samples": len(seconds),
        "seconds": sum(seconds),
        "seconds_per_sample": sum(seconds) / len(seconds),
    }
    return results


def run_evaluation(
    evaluator: Evaluator,
    samples: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = True,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
    log: SamplesLog | None = None,
) -> dict[str, Any]:
    """Evaluate every sample, build the results and (with ``out_dir``) write all outputs.

    With ``out_dir`` each finished sample is appended to ``out_dir/samples.jsonl`` first (``log``: one already
    checked by :meth:`SamplesLog.prepare`, else it is prepared here with ``resume`` and ``fingerprint``); samples
    an earlier run of the same settings finished are skipped when resuming."""
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("no samples to evaluate (check --data, --tasks and --limit)")
    settings = evaluator.settings
    cfg = run_config(config, settings, evaluator.methods, evaluator.capture)
    if log is None and out_dir is not None:
        log = SamplesLog.prepare(out_dir, run_header(cfg, settings, samples, fingerprint), resume)
    elif log is not None and log.header["config"] != cfg:
        raise ValueError(f"{log.path} was prepared for other settings than this evaluator's")
    entries = dict(log.done) if log is not None else {}
    ids = {s["id"] for s in samples}
    stray = [sid for sid in entries if sid not in ids]
    if stray:
        raise ValueError(f"{log.path} holds samples that are not in this selection: {', '.join(map(repr, stray[:3]))}")
    todo = [s for s in samples if s["id"] not in entries]
    if log is not None:
        log.start()
        if entries:
            torn = " (a torn last line was dropped)" if log.torn else ""
            print(f"resuming {log.path}: {len(entries)} of {len(samples)} samples done{torn}, {len(todo)} to go")
    bar = tqdm(todo, desc=f"evaluate ({settings.protocol})", unit="sample", disable=not progress)
    try:
        for sample in bar:
            result = evaluator.evaluate_sample(sample)
            entry = sample_entry(sample, result)
            if log is not None:
                log.append(entry)
            entries[sample["id"]] = entry
            release_free_memory()
            bar.set_postfix(n=result.context_tokens, s=f"{result.seconds:.1f}")
    finally:
        bar.close()
        if log is not None:
            log.close()
    results = results_from_entries([entries[s["id"]] for s in samples], evaluator, cfg)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results
