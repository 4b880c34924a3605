"""Reading and writing evaluation samples as JSON Lines.

One JSON object per line. Required: ``context`` (str), ``question`` (str), ``answers`` (non-empty list of
non-empty str: an empty or whitespace-only gold answer cannot be scored), ``metric`` (one of ``METRIC_NAMES``, the
metrics ``polykv_learn.eval.metrics`` scores). Optional: ``task`` (str, default ``"custom"``), ``id`` (str,
default ``"line<N>"``, unique in the file), ``answer_prefix`` (str, default ``""``), ``max_new_tokens`` (positive
int, default by metric: ``DEFAULT_MAX_NEW_TOKENS``), ``all_classes`` (non-empty list of str, used by
``classification``). Other keys (e.g. ``split``) are kept as they are.
Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from polykv_learn.atomic import atomic_write_text  # re-exported: data.prepare and the peer benchmarks import it here

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "METRIC_NAMES", "atomic_write_text", "load_samples", "write_jsonl"]

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "string_match": 32,
    "qa_f1": 32,
    "rouge_l": 128,
    "classification": 16,
    "code_sim": 64,
}
"""Generation length used when a sample gives no ``max_new_tokens``."""

METRIC_NAMES: tuple[str, ...] = tuple(DEFAULT_MAX_NEW_TOKENS)
"""The metrics a sample may name (``polykv_learn.eval.metrics.METRICS`` implements exactly these)."""

_REQUIRED = {
    "context": "a string",
    "question": "a string",
    "answers": "a non-empty list of strings",
    "metric": f"one of {', '.join(METRIC_NAMES)}",
}


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _check(obj: Any, where: str) -> dict[str, Any]:
    """Validate one decoded line and fill the defaults; raise ``ValueError`` prefixed with ``where``."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, expected in _REQUIRED.items():
        if key not in obj:
            raise ValueError(
                f"{where}: missing required key {key!r} ({expected}); required keys: {', '.join(_REQUIRED)}"
            )
    for key in ("context", "question"):
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    if not isinstance(obj["answers"], list) or not all(isinstance(a, str) for a in obj["answers"]):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of strings, got {obj['answers']!r:.80}")
    if not obj["answers"]:
        raise ValueError(f"{where}: 'answers' is empty; give at least one gold answer string")
    blank = [i for i, a in enumerate(obj["answers"]) if not a.strip()]
    if blank:
        raise ValueError(
            f"{where}: 'answers'[{blank[0]}] is {obj['answers'][blank[0]]!r}; every gold answer must be a non-empty "
            "string (not only whitespace)"
        )
    if obj["metric"] not in METRIC_NAMES:
        raise ValueError(f"{where}: unknown metric {obj['metric']!r}; allowed: {', '.join(METRIC_NAMES)}")
    for key in ("task", "id", "answer_prefix"):
        if key in obj and not isinstance(obj[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    if "max_new_tokens" in obj:
        n = obj["max_new_tokens"]
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{where}: 'max_new_tokens' must be a positive integer, got {n!r}")
    if "all_classes" in obj and not _is_str_list(obj["all_classes"]):
        raise ValueError(f"{where}: 'all_classes' must be a non-empty list of strings, got {obj['all_classes']!r:.80}")
    return obj


def load_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load and validate the samples of a JSONL file (see the module docstring for the schema).

    Raises ``ValueError("<path>:<line>: <problem>")`` on the first bad line."""
    samples: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{where}: invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object"
                ) from None
            sample = _check(obj, where)
            sample.setdefault("task", "custom")
            sample.setdefault("id", f"line{lineno}")
            sample.setdefault("answer_prefix", "")
            sample.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS[sample["metric"]])
            if sample["id"] in seen:
                raise ValueError(f"{where}: duplicate id {sample['id']!r} (first on line {seen[sample['id']]})")
            seen[sample["id"]] = lineno
            samples.append(sample)
    return samples


def write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write records as JSON Lines atomically (:func:`polykv_learn.atomic.atomic_write_text`); returns the number
    written."""
    count = 0

    def lines() -> Iterable[str]:
        nonlocal count
        for record in records:
            yield json.dumps(record, ensure_ascii=False) + "\n"
            count += 1

    atomic_write_text(path, lines())
    return count
