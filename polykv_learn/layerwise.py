"""Adaptive planning that reads each layer once, as soon as that layer's prefill attention is done.

An adaptive :class:`~polykv_learn.cache.CompressedCache` decides its plan after the last layer's prefill. With a
plain planner (``fn(stats_per_layer)``) every layer keeps its whole scoring statistics (window attention,
accumulated attention, window queries, RoPE tables) until then. A :class:`LayerwisePlanner` says up front what
the plan needs of a layer (``summarize``) and which policies the plan may give it (``policies``): the cache
summarises each layer right after its prefill attention, computes the keep order of every row under each of those
policies (:class:`KeepOrders`, what eviction needs) and drops the statistics, so only the layer's keys/values and
these small results wait for the plan.

A ``LayerwisePlanner`` is also a plain planner: called on the statistics of every layer it returns the plan the
cache would apply (``plan([summarize(s) for s in stats])``), which is what capture-only caches, forks and the
simulator use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polykv_learn.plan import Plan
from polykv_learn.policies import LayerStats, check_policy_name, get_policy, order_positions

__all__ = ["KeepOrders", "LayerwisePlanner"]


@dataclass(frozen=True)
class LayerwisePlanner:
    """An adaptive planner in two steps (see the module docstring).

    summarize: the batched statistics of ONE layer (every row) -> that layer's summary (anything; it must not
        hold views of the statistics, or they stay alive);
    plan: the summaries of every layer, in layer order -> one ``Plan`` for every row or one ``Plan`` per row;
    policies: every policy ``plan`` may give a layer (default options); eviction with another one raises.
    """

    summarize: Callable[[LayerStats], Any]
    plan: Callable[[list[Any]], Plan | Sequence[Plan]]
    policies: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.policies, str) or not self.policies:
            raise ValueError(f"LayerwisePlanner.policies must be a non-empty sequence of names, got {self.policies!r}")
        object.__setattr__(self, "policies", tuple(check_policy_name(p) for p in self.policies))
        if not callable(self.summarize) or not callable(self.plan):
            raise TypeError("LayerwisePlanner.summarize and LayerwisePlanner.plan must be callable")

    def __call__(self, stats: Sequence[LayerStats]) -> Plan | Sequence[Plan]:
        """The plan(s) for the statistics of every layer: what a cache that summarised each layer applies."""
        return self.plan([self.summarize(s) for s in stats])


def _index_dtype(n: int) -> torch.dtype:
    """The smallest integer dtype that holds the positions ``0 .. n - 1``."""
    return torch.int16 if n <= 2**15 else torch.int32 if n <= 2**31 else torch.long


@dataclass(frozen=True)
class KeepOrders:
    """What eviction needs of one layer once its statistics are gone: for each row alone (cut to its real tokens)
    and each policy, the positions of every KV head from best to worst (``order_positions``).

    lengths: real tokens of each row; orders: policy -> one ``(G, n_row)`` tensor per row (a compact integer dtype).
    """

    lengths: tuple[int, ...]
    orders: dict[str, tuple[Tensor, ...]]

    @classmethod
    def of(cls, rows: Sequence[LayerStats], policies: Sequence[str]) -> KeepOrders:
        """The orders of ``rows`` (each the batch-1 statistics of one row alone, ``cache.row_stats``)."""
        orders = {}
        for p in policies:
            policy = get_policy(p)
            # (1, G, n_row) long -> (G, n_row): a compact copy, so nothing of the statistics stays alive
            orders[p] = tuple(order_positions(policy, rs)[0].to(_index_dtype(rs.context_length)) for rs in rows)
        return cls(lengths=tuple(rs.context_length for rs in rows), orders=orders)

    def keep_indices(self, row: int, policy: str, budget: int) -> Tensor:
        """The kept positions of each KV head of ``row`` alone, ascending: ``(G, min(budget, n_row))`` long; the
        same as :func:`~polykv_learn.policies.keep_indices` on that row's statistics."""
        if budget < 1:
            raise ValueError(f"budget must be a positive integer, got {budget}")
        if policy not in self.orders:
            raise ValueError(
                f"no keep order for policy {policy!r}: this layer was summarised for {', '.join(self.orders)} only "
                "(LayerwisePlanner.policies)"
            )
        order = self.orders[policy][row]  # (G, n_row)
        return order[:, : min(budget, self.lengths[row])].sort(dim=-1).values.long()
