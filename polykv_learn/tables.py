"""Markdown tables of validation results, shared by training (model cards) and deployment (no dependencies)."""

from __future__ import annotations

__all__ = ["describe_table"]


#: the validation row of a fit with a learned head allocator: its layer plan with every head keeping the layer budget
EVEN_HEADS = "learned_even_heads"


def describe_table(table: dict[int, dict[str, float]]) -> str:
    """A Markdown table of validation KLs: learned vs best uniform vs PyramidKV (and their ratio).

    ``table``: budget -> method -> mean KL, with the methods ``learned``, ``best_uniform``, ``pyramid`` (absent
    when SnapKV is not routed: "–") and one entry per routed policy (its uniform plan); ``learned_even_heads`` (fits
    with a learned head allocator: the learned layer plan with every head keeping ``b_l``) gets a column when
    present."""
    even = any(EVEN_HEADS in row for row in table.values())
    lines = [
        "| B | learned |" + (" learned, heads even |" if even else "") + " best uniform (policy) | PyramidKV "
        "| learned / best uniform |",
        "|---|---|" + ("---|" if even else "") + "---|---|---|",
    ]
    for budget in sorted(table):
        row = table[budget]
        singles = {k: v for k, v in row.items() if k not in ("learned", "pyramid", "best_uniform", EVEN_HEADS)}
        best_name = min(singles, key=singles.get)
        heads = f" {row[EVEN_HEADS]:.4f} |" if even else ""
        pyramid = f"{row['pyramid']:.4f}" if "pyramid" in row else "–"  # a fit whose pool has no SnapKV
        lines.append(
            f"| {budget} | {row['learned']:.4f} |{heads} {row['best_uniform']:.4f} ({best_name}) "
            f"| {pyramid} | {row['learned'] / row['best_uniform']:.3f} |"
        )
    return "\n".join(lines)
