"""Markdown tables of validation results, shared by training (model cards) and deployment (no dependencies)."""

from __future__ import annotations

__all__ = ["describe_table"]


def describe_table(table: dict[int, dict[str, float]]) -> str:
    """A Markdown table of validation KLs: learned vs best uniform vs PyramidKV (and their ratio).

    ``table``: budget -> method -> mean KL, with the methods ``learned``, ``pyramid``, ``best_uniform`` and one
    entry per routed policy (its uniform plan)."""
    lines = [
        "| B | learned | best uniform (policy) | PyramidKV | learned / best uniform |",
        "|---|---|---|---|---|",
    ]
    for budget in sorted(table):
        row = table[budget]
        singles = {k: v for k, v in row.items() if k not in ("learned", "pyramid", "best_uniform")}
        best_name = min(singles, key=singles.get)
        lines.append(
            f"| {budget} | {row['learned']:.4f} | {row['best_uniform']:.4f} ({best_name}) | {row['pyramid']:.4f} "
            f"| {row['learned'] / row['best_uniform']:.3f} |"
        )
    return "\n".join(lines)
