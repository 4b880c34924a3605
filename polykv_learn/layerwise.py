"""Adaptive planning that reads each layer once, as soon as that layer's prefill attention is done.

An adaptive :class:`~polykv_learn.cache.CompressedCache` decides its plan after the last layer's prefill. With a
plain planner (``fn(stats_per_layer)``) every layer keeps its whole scoring statistics (window attention,
accumulated attention, window queries, RoPE tables) until then. A :class:`LayerwisePlanner` says up front what
the plan needs of a layer (``summarize``) and which policies the plan may give each row there (``candidates``,
within ``policies``): the cache summarises each layer right after its prefill attention, computes the keep order
of every row under each of its candidates (:class:`KeepOrders`, what eviction needs) and drops the statistics, so
only the layer's keys/values and these small results wait for the plan. When the cache's capture accumulates
attention (H2O) and ``summarize`` does not read it, that costly statistic is computed only for layers where a
candidate needs it. KVzip's reconstruction attention exists only after the last layer (a second pass over the
whole model): a layer whose candidates include a policy that needs it keeps its statistics until then, and the pass
runs only if some layer does (or if ``summarize`` reads it: every layer is then summarised after the pass).

A ``LayerwisePlanner`` is also a plain planner: called on the statistics of every layer (a capture-only cache's)
it returns the plan a cache that summarised each layer applies, ``plan([summarize(s) for s in stats])``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polykv_learn import headwise
from polykv_learn.kvzip_global import KVZIP_POLICY, global_plan, normalised_scores
from polykv_learn.plan import Plan
from polykv_learn.policies import LayerStats, check_policy_name, get_policy, order_positions
from polykv_learn.rows import row_stats

__all__ = ["KeepOrders", "LayerwisePlanner", "adakv_planner", "kvzip_global_planner"]


@dataclass(frozen=True)
class LayerwisePlanner:
    """An adaptive planner in two steps (see the module docstring).

    summarize: the batched statistics of ONE layer (every row) -> that layer's summary (anything; it must not
        hold views of the statistics, or they stay alive);
    plan: the summaries of every layer, in layer order -> one ``Plan`` for every row or one ``Plan`` per row;
    policies: every policy ``plan`` may give a layer (default options);
    candidates: a layer's summary -> for each row, the policies ``plan`` may give that row in this layer (a subset
        of ``policies``; an empty one for a row the plan keeps whole); None: ``policies`` for every row. A plan
        that evicts a row with a policy outside its candidates raises before any layer is evicted;
    summarize_reads_accumulated_attn: whether ``summarize`` reads ``LayerStats.accumulated_attn``; if not, the
        statistics it gets may lack it, and a cache computes it afterwards only where a candidate needs it;
    summarize_reads_reconstruct_attn: whether ``summarize`` reads ``LayerStats.reconstruct_attn``; if so (and the
        cache's capture records it), every layer is summarised after the reconstruction pass; if not, it gets
        statistics without it, and the pass runs only if a candidate needs it.
    """

    summarize: Callable[[LayerStats], Any]
    plan: Callable[[list[Any]], Plan | Sequence[Plan]]
    policies: tuple[str, ...]
    candidates: Callable[[Any], Sequence[Collection[str]]] | None = None
    summarize_reads_accumulated_attn: bool = True
    summarize_reads_reconstruct_attn: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.policies, str) or not self.policies:
            raise ValueError(f"LayerwisePlanner.policies must be a non-empty sequence of names, got {self.policies!r}")
        object.__setattr__(self, "policies", tuple(check_policy_name(p) for p in self.policies))
        hooks = (self.summarize, self.plan) + (() if self.candidates is None else (self.candidates,))
        if not all(callable(f) for f in hooks):
            raise TypeError("LayerwisePlanner.summarize, plan and candidates (if given) must be callable")

    def __call__(self, stats: Sequence[LayerStats]) -> Plan | Sequence[Plan]:
        """The plan(s) for the statistics of every layer: what a cache that summarised each layer applies."""
        return self.plan([self.summarize(s) for s in stats])

    def candidates_of(self, summary: Any, batch: int) -> list[frozenset[str]]:
        """The checked candidates of every row of a layer (see the class docstring)."""
        if self.candidates is None:
            return [frozenset(self.policies)] * batch
        rows = [frozenset(c) for c in self.candidates(summary)]
        if len(rows) != batch:
            raise ValueError(f"LayerwisePlanner.candidates gave {len(rows)} rows for a batch of {batch}")
        for r, c in enumerate(rows):
            if not c <= set(self.policies):
                other = ", ".join(sorted(c - set(self.policies)))
                raise ValueError(f"LayerwisePlanner.candidates gave row {r} {other}, not in its policies")
        return rows


def adakv_planner(policy: str, budget: int, alpha: float = headwise.DEFAULT_ALPHA) -> LayerwisePlanner:
    """AdaKV (arXiv:2407.11550) in a deployed cache: the uniform layer budget ``budget``, each layer's head budgets
    computed from its own statistics as its prefill ends, row by row (each row alone, cut to its real tokens), so
    every row gets :meth:`Plan.adakv` of its own statistics and no layer keeps its statistics until the plan."""
    check_policy_name(policy)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    floor = headwise.adakv_floor(alpha, budget)
    scorer = get_policy(policy)

    def summarize(stats: LayerStats) -> list[tuple[int, ...] | None]:  # per row: head budgets, None = keep all
        rows = [row_stats(stats, r) for r in range(stats.valid.shape[0])]
        return [
            None
            if rs.context_length <= budget
            else tuple(headwise.head_counts(*headwise.ordered_keys(scorer, rs), budget, floor))
            for rs in rows
        ]

    def plan(summaries: list[list[tuple[int, ...] | None]]) -> list[Plan]:
        uniform = Plan.uniform(policy, budget, len(summaries))
        rows = zip(*summaries, strict=True)  # per row: every layer's head budgets
        return [uniform if heads[0] is None else uniform.with_head_budgets(heads) for heads in rows]

    return LayerwisePlanner(
        summarize,
        plan,
        (policy,),
        summarize_reads_accumulated_attn=scorer.needs_accumulated_attn,
        summarize_reads_reconstruct_attn=scorer.needs_reconstruct_attn,
    )


def kvzip_global_planner(budget: int, heads: bool = True) -> LayerwisePlanner:
    """KVzip's own allocation (Kim et al., arXiv:2505.23416; kvpress ``KVzipPress`` with ``layerwise=False``) in a
    deployed cache: after the reconstruction pass, one top-``L * G * budget`` over every layer's max-normalised
    KVzip scores gives the layer budgets and, with ``heads``, each KV head's share
    (:func:`~polykv_learn.kvzip_global.global_plan`), row by row (each row alone, cut to its real tokens): the
    evaluation's ``kvzip-global-heads`` (``heads=False``: ``kvzip-global``). A layer keeps its row's normalised
    scores and keep-order keys, ``(G, n)`` each, until the plan."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    scorer = get_policy(KVZIP_POLICY)

    def summarize(stats: LayerStats) -> list[tuple[Tensor, tuple[Tensor, Tensor] | None]]:  # per row
        rows = [row_stats(stats, r) for r in range(stats.valid.shape[0])]
        return [(normalised_scores(rs), headwise.ordered_keys(scorer, rs) if heads else None) for rs in rows]

    def plan(summaries: list[list[tuple[Tensor, tuple[Tensor, Tensor] | None]]]) -> list[Plan]:
        rows = zip(*summaries, strict=True)  # per row: every layer's (scores, keys)
        return [global_plan([s for s, _ in row], budget, [k for _, k in row] if heads else None) for row in rows]

    return LayerwisePlanner(summarize, plan, (KVZIP_POLICY,), summarize_reads_accumulated_attn=False)


def _index_dtype(n: int) -> torch.dtype:
    """The smallest integer dtype that holds the positions ``0 .. n - 1``."""
    return torch.int16 if n <= 2**15 else torch.int32 if n <= 2**31 else torch.long


@dataclass(frozen=True)
class KeepOrders:
    """What eviction needs of one layer once its statistics are gone: for each row alone (cut to its real tokens)
    and each of its policies, the positions of every KV head from best to worst (``order_positions``).

    lengths: real tokens of each row; orders: per row, policy -> ``(G, n_row)`` (a compact integer dtype).
    """

    lengths: tuple[int, ...]
    orders: tuple[dict[str, Tensor], ...]

    @classmethod
    def of(cls, rows: Sequence[LayerStats], policies: Sequence[Collection[str]]) -> KeepOrders:
        """The orders of ``rows`` (each the batch-1 statistics of one row alone, ``cache.row_stats``) under the
        policies of each row (``policies[r]``)."""
        orders = []
        for rs, names in zip(rows, policies, strict=True):
            # (1, G, n_row) long -> (G, n_row): a compact copy, so nothing of the statistics stays alive
            index = _index_dtype(rs.context_length)
            orders.append({p: order_positions(get_policy(p), rs)[0].to(index) for p in sorted(names)})
        return cls(lengths=tuple(rs.context_length for rs in rows), orders=tuple(orders))

    def merged(self, other: KeepOrders) -> KeepOrders:
        """These orders and ``other``'s (the same rows; ``other`` wins where both have a policy)."""
        if other.lengths != self.lengths:
            raise ValueError(f"cannot merge keep orders of rows {other.lengths} into rows {self.lengths}")
        return KeepOrders(self.lengths, tuple({**a, **b} for a, b in zip(self.orders, other.orders, strict=True)))

    def check(self, policies: Sequence[str], budgets: Sequence[int], layer_idx: int) -> None:
        """ValueError unless every row that ``budgets`` evicts (budget below its length) has its policy's order."""
        for r, (policy, budget) in enumerate(zip(policies, budgets, strict=True)):
            if budget < self.lengths[r] and policy not in self.orders[r]:
                kept = ", ".join(self.orders[r]) or "none"
                raise ValueError(
                    f"layer {layer_idx}, row {r}: the plan evicts with {policy!r}, but the layer's summary kept keep "
                    f"orders for {kept} only (LayerwisePlanner.candidates / policies)"
                )

    def order(self, row: int, policy: str) -> Tensor:
        """The keep order of ``row`` alone under ``policy``: ``(G, n_row)`` positions, best first (compact dtype)."""
        if policy not in self.orders[row]:
            kept = ", ".join(self.orders[row]) or "none"
            raise ValueError(f"no keep order for policy {policy!r} in row {row}: this layer kept {kept} only")
        return self.orders[row][policy]

    def keep_indices(self, row: int, policy: str, budget: int) -> Tensor:
        """The kept positions of each KV head of ``row`` alone, ascending: ``(G, min(budget, n_row))`` long; the
        same as :func:`~polykv_learn.policies.keep_indices` on that row's statistics."""
        if budget < 1:
            raise ValueError(f"budget must be a positive integer, got {budget}")
        order = self.order(row, policy)  # (G, n_row)
        return order[:, : min(budget, self.lengths[row])].sort(dim=-1).values.long()
