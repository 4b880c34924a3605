"""KVzip's global allocation, as a plan and as a layer signal the learned allocator can follow exactly.

KVzip (Kim et al., arXiv:2505.23416; kvpress ``KVzipPress`` with ``layerwise=False``) ranks every
``(layer, KV head, position)`` by its reconstruction score divided by the layer's largest (protected sinks above
everything, padding below) and keeps one top-``L * G * B`` across all layers. Layer ``l`` then holds
``count_l / G`` positions per KV head: :func:`global_layer_budgets`. On natural-text needles this allocation is what
finds pass keys query-agnostic at tight budgets (docs/results.md), where KVzip's scores with a uniform budget do not.

The **allocation prior** ``kvzip_global`` gives the learned allocator the same allocation as a signal: a layer's
column is ``log((count_l / G + 1) / (B + 1))``. The allocator adds it to its logits with a learned gain
(:class:`~polykv_learn.planner.allocator.BudgetAllocator`, ``prior``); since its budgets are ``L * B * softmax(z)``,
gain 1 and a zero MLP give budgets proportional to ``count_l / G + 1``: KVzip's allocation (up to the ``+ 1`` and
the ``[b_min, n]`` projection), which training then corrects. The column needs every layer's scores, so it is
computed across layers (:func:`prior_column`), after the reconstruction pass, never by one layer alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polykv_learn import headwise
from polykv_learn.budgets import round_preserving_sum
from polykv_learn.plan import Plan
from polykv_learn.policies import get_policy
from polykv_learn.policies.base import LayerStats

__all__ = [
    "ALLOCATION_PRIORS",
    "KVZIP_POLICY",
    "check_allocation_prior",
    "global_counts",
    "global_layer_budgets",
    "global_plan",
    "normalised_scores",
    "prior_column",
]

#: the scorer whose scores the global allocation ranks across layers
KVZIP_POLICY = "kvzip"

#: the allocation priors a learner may use (the name is also its feature column)
ALLOCATION_PRIORS = ("kvzip_global",)


def check_allocation_prior(prior: str | None) -> str | None:
    """``prior`` itself, or a one-line ValueError naming the allowed values."""
    if prior is not None and prior not in ALLOCATION_PRIORS:
        raise ValueError(f"allocation_prior must be null or one of {', '.join(ALLOCATION_PRIORS)}, got {prior!r}")
    return prior


def normalised_scores(stats: LayerStats, row: int = 0) -> Tensor:
    """Row ``row``'s KVzip scores of one layer, ``(G, n)`` float64: divided by the row's largest real score (so in
    ``[0, 1]``), the protected sinks 2.0 (kept first), padding -1.0 (kept last)."""
    policy = get_policy(KVZIP_POLICY)
    score = policy.scores(stats)[row].double()  # (G, n)
    valid = stats.valid[row].to(score.device)  # (n,)
    top = score.masked_fill(~valid[None, :], 0).max()
    score = score / top if top > 0 else torch.zeros_like(score)
    protected = policy.protected(stats)
    if protected is not None:
        score = score.masked_fill(protected[row][None, :].to(score.device), 2.0)
    return score.masked_fill(~valid[None, :], -1.0)  # (G, n)


def global_counts(scores: Sequence[Tensor], budget: int) -> Tensor:
    """Kept ``(KV head, position)`` pairs per layer, ``(L,)`` float64, of one top-``L * G * budget`` over the
    :func:`normalised_scores` of every layer (each ``(G, n)``; stable: ties to the earlier layer, head,
    position)."""
    num_layers = len(scores)
    g, n = scores[0].shape
    flat = torch.stack(list(scores)).flatten()  # (L * G * n)
    k = min(num_layers * g * budget, flat.numel())
    chosen = flat.argsort(descending=True, stable=True)[:k]
    return torch.bincount(chosen // (g * n), minlength=num_layers).double()  # (L,)


def global_layer_budgets(stats: Sequence[LayerStats], budget: int, row: int = 0) -> list[int]:
    """KVzip's global allocation for row ``row`` (cut to its real tokens first when padded): layer ``l`` gets
    ``count_l / G`` positions per KV head, rounded with the exact total ``L * B`` within ``[1, n]``
    (:func:`~polykv_learn.plan.round_preserving_sum`). ``n <= B``: ``B`` everywhere (nothing evicted). Within a
    layer every head keeps the same number (:func:`global_plan` with ``head_keys`` splits it as KVzip does)."""
    return list(global_plan([normalised_scores(s, row) for s in stats], budget).budgets)


def global_plan(
    scores: Sequence[Tensor], budget: int, head_keys: Sequence[tuple[Tensor, Tensor]] | None = None
) -> Plan:
    """KVzip's global allocation of one sequence as a ``kvzip`` plan, from every layer's :func:`normalised_scores`
    ``(G, n)``: the layer budgets of :func:`global_layer_budgets`; with ``head_keys`` (every layer's
    :func:`~polykv_learn.headwise.ordered_keys` under ``kvzip``) also KVzip's per-head selection: each layer's
    ``G * b_l`` shared among its KV heads by one top over the same scores, sinks first, no floor (one divisor per
    layer leaves its order unchanged, so this is the global top-k restricted to the layer, up to rounding its count
    to a multiple of ``G``; a head may keep nothing). ``n <= B``: ``B`` everywhere (nothing evicted)."""
    num_layers, (g, n) = len(scores), scores[0].shape
    if n <= budget:
        return Plan.uniform(KVZIP_POLICY, budget, num_layers)
    layers = round_preserving_sum(global_counts(scores, budget) / g, num_layers * budget, lower=1, upper=n)
    plan = Plan.from_lists([KVZIP_POLICY] * num_layers, layers)
    if head_keys is None:
        return plan
    heads = [
        (b,) * g if b >= n else tuple(headwise.head_counts(*keys, b, 0))
        for keys, b in zip(head_keys, layers, strict=True)
    ]
    return plan.with_head_budgets(heads)


def prior_column(scores: Sequence[Tensor], budget: int) -> Tensor:
    """The ``kvzip_global`` column ``(L,)`` float32 of one sequence: ``log((count_l / G + 1) / (B + 1))`` from the
    :func:`normalised_scores` of every layer (each ``(G, n)``). When ``n <= B`` every layer holds its ``n``."""
    g, n = scores[0].shape
    if n <= budget:
        per_head = torch.full((len(scores),), float(n), dtype=torch.float64)
    else:
        per_head = global_counts(scores, budget) / g  # (L,)
    return ((per_head + 1) / (budget + 1)).log().float()  # (L,)
