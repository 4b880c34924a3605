"""One-line checks of the fit configuration, run by the constructors of the learner and the data module (and on
the pair by :meth:`PolyKVLearner.check_data`) before any model is loaded or any prefill is built.

Every message names the field and says what is allowed, e.g. ``lr must be a number > 0, got -1.0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from polykv_learn.policies import POLICIES


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_at_least(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """``value`` is an integer >= ``minimum`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" (or null)" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def positive(name: str, value: Any) -> None:
    """``value`` is a finite number > 0."""
    if not is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def non_negative(name: str, value: Any) -> None:
    """``value`` is a finite number >= 0."""
    if not is_number(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def budget_list(name: str, values: Any) -> list[int]:
    """``values`` is a non-empty, strictly increasing list of integers >= 1; returned as a list."""
    ok = isinstance(values, (list, tuple)) and len(values) > 0 and all(is_int(b) and b >= 1 for b in values)
    ok = ok and all(a < b for a, b in zip(values, values[1:], strict=False))
    if not ok:
        raise ValueError(f"{name} must be a non-empty increasing list of integers >= 1, got {values!r}")
    return list(values)


def policy_list(name: str, values: Any, routable: bool = False, allow_empty: bool = True) -> list[str]:
    """``values`` is a list of distinct registered policy names (routable ones only when ``routable``)."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(p, str) for p in values):
        raise ValueError(f"{name} must be a list of policy names ({', '.join(POLICIES)}), got {values!r}")
    if not values and not allow_empty:
        raise ValueError(f"{name} must name at least one policy ({', '.join(POLICIES)}), got []")
    for p in values:
        if p not in POLICIES:
            raise ValueError(f"{name}: unknown policy {p!r}; known policies: {', '.join(POLICIES)}")
    duplicates = sorted({p for p in values if list(values).count(p) > 1})
    if duplicates:
        raise ValueError(f"{name} must name each policy once, got {duplicates} more than once")
    if routable:
        controls = [p for p in values if not POLICIES[p].routable]
        if controls:
            allowed = [p for p, cls in POLICIES.items() if cls.routable]
            raise ValueError(
                f"{name}: policies {controls} are controls and cannot be routed; allowed: {', '.join(allowed)}"
            )
    return list(values)


def one_of(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def distinct_choices(name: str, values: Any, allowed: Sequence[str]) -> list[str]:
    """``values`` is a non-empty list of distinct members of ``allowed``; returned as a list."""
    ok = isinstance(values, (list, tuple)) and len(values) > 0 and all(isinstance(v, str) for v in values)
    if not ok or any(v not in allowed for v in values) or len(set(values)) != len(values):
        choices = ", ".join(allowed)
        raise ValueError(f"{name} must be a non-empty list of distinct values from {choices}, got {values!r}")
    return list(values)


def within_context(name: str, values: Sequence[int], max_positions: int | None, model_name: str) -> None:
    """Budgets above the model's context (``max_position_embeddings``) can never be evaluated."""
    if max_positions is None:
        return
    too_big = [b for b in values if b > max_positions]
    if too_big:
        raise ValueError(
            f"{name} {too_big} exceed the model's context of {max_positions} tokens ({model_name}); "
            f"allowed: 1 to {max_positions}"
        )


def in_grid(name: str, values: Sequence[int], grid: Sequence[int]) -> None:
    """Every budget of ``values`` is one of the data module's grid (the only budgets with cached features)."""
    missing = [b for b in values if b not in grid]
    if missing:
        raise ValueError(
            f"{name} {missing} are not in the data module's budget grid (data.budgets); "
            f"allowed: {', '.join(map(str, grid))}"
        )
