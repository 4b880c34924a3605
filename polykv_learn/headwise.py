"""Head-wise budgets: how many positions each KV head of a layer keeps (AdaKV's allocation, design §2).

AdaKV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference", arXiv:2407.11550) keeps a layer's total ``G * b`` but lets its KV heads share it unevenly: one top-
``G * b`` over the scores of every ``(head, position)`` of the layer, each head guaranteed a floor of
``alpha * b`` positions (its safeguard; kvpress ``AdaKVPress`` with ``alpha_safeguard = 0.2``). A head then keeps
the first ``b_h`` positions of its own keep order (:func:`~polykv_learn.policies.order_positions`), so the
allocation only decides the counts and the real cache and the simulator keep the same positions.

Every head's positions are ranked by the key ``(protected, score)`` taken in the head's keep order, which never
increases along the order (the order sorts protected positions first, then by score): so whatever a flattened
top-k takes of a head is a prefix of its order, and the counts below are exactly what the selection keeps. Ties
go to the earlier head, then the earlier rank (stable sorts), so the counts are deterministic.

The global variant ranks every ``(layer, head, position)`` at once after dividing each layer's scores by the
layer's largest (as KVzip's and AdaKV's cross-layer selections do), protected positions first everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from polykv_learn.policies import LayerStats, Policy, order_positions

__all__ = ["DEFAULT_ALPHA", "KeysFn", "adakv_floor", "global_counts", "head_counts", "ordered_keys", "split_heads"]

#: ``keys(layer, policy)`` -> :func:`ordered_keys` of that layer's statistics under that policy (``(G, n)`` x2)
KeysFn = Callable[[int, str], tuple[Tensor, Tensor]]

#: AdaKV's safeguard share: every head keeps at least ``floor(alpha * b)`` of a layer budget ``b``
DEFAULT_ALPHA = 0.2


def adakv_floor(alpha: float, budget: int) -> int:
    """The per-head floor ``floor(alpha * budget)``; ValueError unless ``0 <= alpha <= 1``."""
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(
            f"alpha (AdaKV's per-head floor, a share of the layer budget) must be in [0, 1], got {alpha!r}"
        )
    return math.floor(alpha * budget + 1e-9)


def ordered_keys(policy: Policy, stats: LayerStats) -> tuple[Tensor, Tensor]:
    """``(protected, score)``, each ``(G, n)``, along every head's keep order under ``policy`` (best first), for
    the statistics of one sequence (batch 1, no padding: :func:`~polykv_learn.cache.row_stats` gives a row's).
    Computed once per policy and statistics (``LayerStats.memo``)."""
    if stats.valid.shape[0] != 1 or not bool(stats.valid.all()):
        raise ValueError(
            f"head budgets are allocated for one sequence without padding, got a batch of {stats.valid.shape[0]} "
            "rows (give each row's own statistics: polykv_learn.cache.row_stats(stats, r))"
        )
    return stats.memo(("ordered_keys", type(policy), repr(policy)), lambda: _ordered_keys(policy, stats))


def _ordered_keys(policy: Policy, stats: LayerStats) -> tuple[Tensor, Tensor]:
    order = order_positions(policy, stats)[0]  # (G, n) positions, best first
    score = policy.scores(stats)[0].float().to(order.device)  # (G, n): the values order_positions sorted
    protected = policy.protected(stats)
    g, n = order.shape
    prot = torch.zeros(g, n, dtype=torch.bool, device=order.device)
    if protected is not None:
        prot = protected[0].to(order.device)[None, :].expand(g, n)
    return prot.gather(-1, order), score.gather(-1, order)  # (G, n) x2, along each head's order


def _top(protected: Tensor, score: Tensor, k: int) -> Tensor:
    """Flat indices of the ``k`` best entries of ``protected``/``score`` (same shape, flattened in C order):
    protected first, then higher score, ties to the lower flat index."""
    order = score.flatten().argsort(descending=True, stable=True)
    order = order[protected.flatten()[order].to(torch.int8).argsort(descending=True, stable=True)]
    return order[:k]


def head_counts(protected: Tensor, score: Tensor, budget: int, floor: int) -> list[int]:
    """AdaKV's head budgets of one layer: ``G`` integers summing to ``G * min(budget, n)``, each in
    ``[min(floor, budget, n), n]``. ``protected``/``score``: ``(G, n)`` along each head's order
    (:func:`ordered_keys`). Each head gets its first ``floor`` positions, then one top over the rest of every head.
    """
    g, n = score.shape
    b = min(budget, n)
    f = min(floor, b)
    if f == n:
        return [n] * g
    chosen = _top(protected[:, f:], score[:, f:], g * (b - f))  # flat indices into (G, n - f)
    extra = torch.bincount(chosen // (n - f), minlength=g)  # (G,)
    return [f + int(c) for c in extra.tolist()]


def split_heads(
    policies: Sequence[str],
    budgets: Sequence[int],
    keys: KeysFn,
    context_length: int,
    num_kv_heads: int,
    alpha: float = DEFAULT_ALPHA,
) -> list[tuple[int, ...]]:
    """AdaKV within every layer of any layer plan (``policies[l]``, ``budgets[l]``): layer ``l``'s ``G * b_l``
    shared among its KV heads by :func:`head_counts` over its own policy's keys, a floor of
    ``floor(alpha * b_l)`` per head. A layer whose budget covers the context (``b_l >= n``) keeps it all
    (``(b_l,) * G``; its keys are never asked for). Per layer ``G`` integers summing to ``G * b_l``, each in
    ``[floor, n]``. ``keys`` is called once per evicting layer: from statistics (:meth:`Plan.with_adakv_heads`)
    or from keys a deployed cache kept of each layer (``PolyKV.layerwise_planner`` with ``head_allocation``)."""
    adakv_floor(alpha, 1)  # alpha is checked before any key is computed
    heads = []
    for layer, (policy, b) in enumerate(zip(policies, budgets, strict=True)):
        if b >= context_length:
            heads.append((b,) * num_kv_heads)
        else:
            heads.append(tuple(head_counts(*keys(layer, policy), b, adakv_floor(alpha, b))))
    return heads


def global_counts(keys: Sequence[tuple[Tensor, Tensor]], budget: int, floor: int) -> list[list[int]]:
    """The global variant's selection: for every layer (``keys[l]`` = :func:`ordered_keys`, all ``(G, n)``), how
    many positions of each head one top-``L * G * min(budget, n)`` takes, after each head's first ``floor``
    positions, over the scores divided by their layer's largest (protected positions first in every layer).
    ValueError for a negative score (the division needs scores that are all of one sign)."""
    g, n = keys[0][1].shape
    b = min(budget, n)
    f = min(floor, b)
    if f == n:
        return [[n] * g for _ in keys]
    prots, scores = [], []
    for layer, (prot, score) in enumerate(keys):
        if bool((score < 0).any()):
            raise ValueError(
                f"the global head allocation divides each layer's scores by its largest, so they must be >= 0; "
                f"layer {layer} has negative scores (use the per-layer allocation for this policy)"
            )
        top = float(score.max())
        scores.append(score[:, f:].double() / top if top > 0 else torch.zeros_like(score[:, f:], dtype=torch.float64))
        prots.append(prot[:, f:])
    chosen = _top(torch.stack(prots), torch.stack(scores), len(keys) * g * (b - f))  # flat into (L, G, n - f)
    extra = torch.bincount(chosen // (n - f), minlength=len(keys) * g).reshape(len(keys), g)  # (L, G)
    return [[f + int(c) for c in row] for row in extra.tolist()]
