"""Small helpers on token sequences shared by the command-line tools (``generate``; ``evaluate`` may use them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

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


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special ids ``tokenizer`` puts before a text by default (Gemma3: its BOS; SmolLM2: none).

    Prompts are tokenised piece by piece without special tokens, so a model trained with a BOS at the start of
    every sequence (Gemma3 degrades badly without it) needs these put back before the first piece once."""
    marked = list(tokenizer("x").input_ids)
    plain = list(tokenizer("x", add_special_tokens=False).input_ids)
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return marked[:start]
    raise ValueError(f"cannot find the plain tokens {plain} of 'x' in the tokenizer's output {marked}")


def lead_before(tokenizer: Any, head: Sequence[int]) -> list[int]:
    """The leading special ids to put before a prompt that starts with ``head`` (its first piece's ids): none when
    the tokenizer adds none or ``head`` already starts with them (a chat template may write the BOS itself)."""
    lead = leading_special_ids(tokenizer)
    return [] if list(head[: len(lead)]) == lead else lead
