"""A deployed adaptive cache with the artifact's learned head allocator (``head_allocation="learned"``, issue #17).

As each layer's prefill ends, its summary keeps the layer signals of every row (:meth:`PolyKV.layer_summary`) and
each row's per-KV-head signals (:func:`~polykv_learn.head_features.head_features` of the row alone, at
``min(B, n_row)``), then the statistics go. After the last layer one :meth:`LearnedPlanner.plan` per row gives the
layer plan and its head budgets (per layer ``G`` integers summing to ``G * b_l``), exactly the plan of
:meth:`PolyKV.plan_for_stats` with ``head_allocation="learned"`` on the full statistics. Unlike AdaKV's split, the
head budgets do not depend on the routed policy's scores, so nothing more than the summaries is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from polykv_learn.cache import row_stats
from polykv_learn.head_features import head_features
from polykv_learn.plan import Plan
from polykv_learn.policies import LayerStats

if TYPE_CHECKING:
    from polykv_learn.deploy.polykv import LayerSummary, PolyKV

#: one layer's summary with learned head allocation: the plain summary and every row's head signals ``(G, Fh)``
LearnedHeadSummary = tuple["LayerSummary", tuple[Tensor, ...]]


def check_learned(polykv: PolyKV) -> None:
    """One-line ValueError when the artifact has no head allocator."""
    if polykv.planner.head_allocator is None:
        raise ValueError(
            "head_allocation='learned' needs an artifact with a learned head allocator (fit with "
            "model.head_allocation: learned); this one has none: use 'none' or 'adakv'"
        )


def sequence_head_features(stats: Sequence[LayerStats], budget: int) -> Tensor:
    """Raw per-head signals ``(L, G, Fh)`` of one sequence's statistics (batch 1, cut to its real tokens)."""
    n = stats[0].context_length
    return torch.cat([head_features(s, min(budget, n), len(stats)) for s in stats])  # (L, G, Fh)


def layer_summary(polykv: PolyKV, stats: LayerStats, budget: int) -> LearnedHeadSummary:
    """:meth:`PolyKV.layer_summary` and, per row (alone, :func:`row_stats`), its head signals ``(G, Fh)``."""
    summary = polykv.layer_summary(stats, budget)
    num_layers = int(polykv.model_fingerprint["num_layers"])
    rows = [row_stats(stats, r) for r in range(stats.valid.shape[0])]
    heads = tuple(head_features(rs, min(budget, rs.context_length), num_layers)[0] for rs in rows)
    return summary, heads


def plans_from_summaries(polykv: PolyKV, summaries: Sequence[LearnedHeadSummary], budget: int) -> list[Plan]:
    """One plan per batch row, with the learned head budgets, from every layer's :func:`layer_summary`."""
    lengths = summaries[0][0][1]
    features = torch.stack([s[0][0] for s in summaries], dim=1)  # (batch, L, F)
    plans = []
    for r, n in enumerate(lengths):
        heads = torch.stack([s[1][r] for s in summaries])  # (L, G, Fh)
        plans.append(polykv.planner.plan(features[r], budget, n, head_features=heads))
    return plans


def candidates(polykv: PolyKV, summary: LearnedHeadSummary, budget: int) -> list[set[str]]:
    """A layer's router candidates: those of its plain summary (:meth:`PolyKV.layer_candidates`)."""
    return polykv.layer_candidates(summary[0], budget)
