"""The evaluation's reports: ``results.json``, ``results.md`` and the three plots (``score_vs_budget.png``,
``plan_map.png``, ``needle_retention.png``), each written atomically (:mod:`polykv_learn.atomic`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from polykv_learn.atomic import atomic_file, atomic_write_text
from polykv_learn.eval.methods import LEARNED_METHODS
from polykv_learn.eval.results import MEANINGFUL_FULL_SCORE

__all__ = [
    "RESULT_FILES",
    "plot_needle_retention",
    "plot_plan_map",
    "plot_score_vs_budget",
    "results_markdown",
    "write_outputs",
]

#: the layer/head-allocation baselines (dotted in the score-vs-budget plot)
ALLOCATION_BASELINES = ("pyramid", "cake", "kvzip-global", "kvzip-global-heads", "adakv", "adakv-global")
RESULT_FILES = ("results.json", "results.md", "score_vs_budget.png", "plan_map.png", "needle_retention.png")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def results_markdown(results: dict[str, Any]) -> str:
    cfg = results.get("config", {})
    budgets = [str(b) for b in cfg.get("budgets", [])]
    methods = list(results["summary"])
    tasks = results["tasks"]
    lines = [
        f"# polykv-learn evaluation ({cfg.get('protocol', '?')})",
        "",
        f"Model `{cfg.get('model', '?')}`, data `{cfg.get('data', '?')}`, {results['timing']['samples']} samples "
        f"({results['timing']['seconds_per_sample']:.1f} s per sample), chat template: {cfg.get('chat')}.",
        "",
        "## Average score (mean over tasks) by average budget",
        "",
        *_budget_header(budgets),
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(results["summary"][m][b]["average"]) for b in budgets) + " |")
    lines += ["", "## Full-cache score per task", "", "| task | score |", "|---|---:|"]
    lines += [
        f"| {t}{' (test-only)' if t in results['test_only_tasks'] else ''} | {_fmt(results['full_cache'][t])} |"
        for t in tasks
    ]
    lines.append(f"| **average** | {_fmt(results['full_cache']['average'])} |")
    threshold = results.get("meaningful_full_score", MEANINGFUL_FULL_SCORE)
    scored, scored_test = results.get("scored_tasks", []), results.get("scored_test_only_tasks", [])
    lines += [
        "",
        f"*Scored tasks* (full cache >= {threshold:g}): {', '.join(scored) or 'none'}; test-only among them: "
        f"{', '.join(scored_test) or 'none'}.",
    ]
    sections = (
        ("scored tasks", "gap_recovery_scored"),
        ("scored test-only task types", "gap_recovery_scored_test_only"),
        ("all tasks", "gap_recovery"),
        ("test-only task types", "gap_recovery_test_only"),
    )
    for title, key in sections:
        table = results.get(key)
        if not table:
            continue
        lines += [
            "",
            f"## Gap recovery, {title}: (method - best single) / (full - best single)",
            "",
            *_budget_header(budgets),
        ]
        for m, row in table.items():
            lines.append(f"| {m} | " + " | ".join(_pct(row[b]["gap_recovery"]) for b in budgets) + " |")
        first = next(iter(table.values()))
        lines.append(
            "| *best single (score)* | "
            + " | ".join(f"{first[b]['best_single']} ({_fmt(first[b]['best_single_score'])})" for b in budgets)
            + " |"
        )
    for title, key in (("gold-answer NLL", "summary_nll"), ("KL to the full cache", "summary_kl")):
        lines += [
            "",
            f"## Mean {title} (mean over tasks)",
            "",
            *_budget_header(budgets),
        ]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(results[key][m][b]["average"]) for b in budgets) + " |")
    lines += _retention_lines(results, methods, budgets)
    lines += ["", "## Score per task", ""]
    for b in budgets:
        lines += [f"### B={b}", "", "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(results["summary"][m][b][t]) for t in tasks) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _retention_lines(results: dict[str, Any], methods: list[str], budgets: list[str]) -> list[str]:
    """The needle-retention section of ``results.md`` (absent in results of older runs)."""
    needle = results.get("needle_retention")
    if not needle:
        return []
    by_task = ", ".join(f"{t} {k}" for t, k in needle["samples_by_task"].items())
    lines = [
        "",
        "## Needle retention: share of the gold answer's context tokens kept (mean over layers and KV heads)",
        "",
        f"{needle['samples']} samples whose first gold answer occurs in the context ({by_task}); "
        f"{needle['excluded']} excluded (answer not in the context). Mean over tasks with a needle.",
    ]
    if not needle["summary"]:
        return lines
    lines += ["", *_budget_header(budgets)]
    for m in methods:
        row = needle["summary"].get(m)
        if row is not None:
            lines.append(f"| {m} | " + " | ".join(_fmt(row[b]["average"]) for b in budgets) + " |")
    return lines


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_score_vs_budget(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [int(b) for b in results["config"]["budgets"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, per_budget in results["summary"].items():
        ys = [per_budget[str(b)]["average"] for b in budgets]
        ys = [math.nan if y is None else y for y in ys]
        if m == "full":
            ax.axhline(ys[0], color="black", linestyle="--", label="full")
            continue
        style = "-" if m in results["learned_methods"] else ":" if m in ALLOCATION_BASELINES else "-."
        width = 2.5 if m in results["learned_methods"] else 1.2
        ax.plot(budgets, ys, style, marker="o", linewidth=width, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("average budget B (kept positions per KV head and layer)")
    ax.set_ylabel("score (mean over tasks)")
    ax.set_title(f"score vs budget ({results['config'].get('protocol', '')})")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)


def plot_plan_map(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = results.get("example_plans", {})
    method = next((m for m in (*LEARNED_METHODS, "cake", "pyramid") if plans.get(m)), None)
    budgets = [str(b) for b in results["config"]["budgets"]]
    rows = [b for b in budgets if method is not None and b in plans[method]]
    fig, axes = plt.subplots(
        max(len(rows), 1), 1, figsize=(9, 2.4 * max(len(rows), 1)), squeeze=False, constrained_layout=True
    )
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no compressed plan to show (contexts shorter than every budget?)", ha="center")
        axes[0, 0].set_axis_off()
    else:
        policies = sorted({p for b in rows for p in plans[method][b]["policies"]})
        colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(policies)}
        for ax, b in zip(axes[:, 0], rows, strict=True):
            plan = plans[method][b]
            layers = range(len(plan["budgets"]))
            ax.bar(layers, plan["budgets"], color=[colors[p] for p in plan["policies"]])
            ax.axhline(int(b), color="black", linewidth=0.8, linestyle="--")
            ax.set_ylabel("budget")
            ax.set_title(f"{method}, B={b}: sample {plan['sample']} (n={plan['context_tokens']})", fontsize=9)
        axes[-1, 0].set_xlabel("layer")
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in policies]
        fig.legend(handles, policies, fontsize=8, ncol=min(len(policies), 7), loc="outside upper center")
    _save_figure(fig, path)
    plt.close(fig)


def plot_needle_retention(results: dict[str, Any], path: Path) -> None:
    """One panel per method (policy or allocation): its needle retention per layer, one line per budget (mean
    over the samples with a needle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = (results.get("needle_retention") or {}).get("layers") or {}
    budgets = [str(b) for b in results["config"]["budgets"]]
    shown = [m for m, per_budget in layers.items() if m != "full" and per_budget]
    cols = min(len(shown), 4) or 1
    rows = max((len(shown) + cols - 1) // cols, 1)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False, sharex=True, sharey=True, constrained_layout=True
    )
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no sample whose gold answer occurs in its context", ha="center")
        axes[0, 0].set_axis_off()
    colors = {b: plt.cm.viridis(i / max(len(budgets) - 1, 1)) for i, b in enumerate(budgets)}
    for ax, m in zip(axes.flat, shown, strict=False):
        for b in budgets:
            if b in layers[m]:
                ax.plot(range(len(layers[m][b])), layers[m][b], marker=".", color=colors[b], label=f"B={b}")
        ax.set_title(m, fontsize=9, fontweight="bold" if m in results["learned_methods"] else "normal")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(shown) :] if shown else []:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("needle kept")
    for ax in axes[-1, :]:
        ax.set_xlabel("layer")
    if shown:
        axes[0, 0].legend(fontsize=7)
        fig.suptitle("share of the gold answer's context tokens kept, per layer (mean over KV heads)", fontsize=10)
    _save_figure(fig, path)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """``results.json``, ``results.md`` and the plots of :data:`RESULT_FILES` in ``out_dir`` (each written
    atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", [json.dumps(_finite(results), indent=1, ensure_ascii=False), "\n"])
    atomic_write_text(out / "results.md", [results_markdown(results)])
    plot_score_vs_budget(results, out / "score_vs_budget.png")
    plot_plan_map(results, out / "plan_map.png")
    plot_needle_retention(results, out / "needle_retention.png")
    return out


def _budget_header(budgets) -> list[str]:
    """Header rows of a Markdown table with one column per budget."""
    return ["| method | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
