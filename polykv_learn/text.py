"""Small helpers on token sequences shared by the command-line tools (``generate``; ``evaluate`` may use them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def cut_middle(ids: Sequence[T], limit: int | None) -> tuple[list[T], int]:
    """Keep at most ``limit`` items of ``ids`` by dropping the middle: the first ``limit // 2`` and the last
    ``limit - limit // 2`` are kept (the start of a prompt holds its instructions, the end its question).

    Returns ``(kept, number_cut)``; ``limit=None`` or a sequence that fits keeps everything."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    items = list(ids)
    if limit is None or len(items) <= limit:
        return items, 0
    head = limit // 2
    return items[:head] + items[len(items) - (limit - head) :], len(items) - limit
