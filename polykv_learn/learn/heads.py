"""Training the learned head allocator with the router and the layer allocator (issue #17, ``model.head_allocation``).

With ``head_allocation: learned`` the learner holds a :class:`~polykv_learn.planner.HeadAllocator` and the mean/std
of the per-KV-head signals (:mod:`polykv_learn.head_features`, stored by the prefill store). Each training row's
real layer budgets ``b_l`` (the layer allocator's, differentiable) are shared among the KV heads by the head
allocator, and the soft keep weights take the ``(R, G)`` head budgets (:func:`~polykv_learn.learn.soft_plan.
soft_key_bias`), so the KL gradient reaches the head allocator and, through ``G * b_l``, the layer allocator. The
hard plans of validation and deployment come from the same module (:meth:`LearnedPlanner.plan` with head
features), rounded per layer with the exact total.

``adakv``: nothing is trained for the heads (AdaKV's rule needs no weights); the artifact records it, so evaluation
and users know that the router was meant to be deployed with ``head_allocation="adakv"``. ``none`` (the default)
changes nothing: no module, no buffer, no store column, no artifact entry (the config hash, over every argument,
does change: it now holds ``head_allocation``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polykv_learn.features import FeatureScaler
from polykv_learn.head_features import HEAD_FEATURE_NAMES
from polykv_learn.learn.store import StoredPrefill
from polykv_learn.planner.head_allocator import HEAD_ALLOCATIONS, HeadAllocator

__all__ = [
    "HEAD_ALLOCATIONS",
    "add_head_allocator",
    "fit_head_scaler",
    "head_features_for",
    "head_scaler",
    "soft_head_budgets",
]


def add_head_allocator(learner: Any, hidden: int) -> None:
    """Give ``learner`` (with ``head_allocation: learned``) its head allocator and the per-head feature statistics
    buffers; others get ``head_allocator = None`` and no buffer (their checkpoints do not change)."""
    learner.head_allocator = None
    if learner.hparams.head_allocation != "learned":
        return
    num = len(HEAD_FEATURE_NAMES)
    learner.head_allocator = HeadAllocator(num, hidden=hidden)
    learner.register_buffer("head_feature_mean", torch.zeros(num))
    learner.register_buffer("head_feature_std", torch.ones(num))


def fit_head_scaler(learner: Any, datamodule: Any) -> None:
    """Fit the per-head feature statistics on the training prefills, once (a resumed fit keeps its own)."""
    if learner.head_allocator is None:
        return
    if bool((learner.head_feature_mean != 0).any() or (learner.head_feature_std != 1).any()):
        return
    mean, std = datamodule.head_feature_statistics()
    learner.head_feature_mean.copy_(mean)
    learner.head_feature_std.copy_(std.clamp_min(FeatureScaler.MIN_STD))


def head_scaler(learner: Any) -> FeatureScaler | None:
    """The learner's live per-head feature scaler (None without a head allocator)."""
    if learner.head_allocator is None:
        return None
    return FeatureScaler(mean=learner.head_feature_mean, std=learner.head_feature_std)


def soft_head_budgets(learner: Any, prefill: StoredPrefill, budgets: list[int], layer_budgets: Tensor) -> Tensor | None:
    """Real head budgets ``(R, L, G)`` of the training rows (average budgets ``budgets``, real layer budgets
    ``layer_budgets`` ``(R, L)``), or None without a head allocator (every head keeps ``b_l``)."""
    if learner.head_allocator is None:
        return None
    n = prefill.context_length
    scaler = head_scaler(learner)
    rows = []
    for r, budget in enumerate(budgets):
        scaled = scaler.transform(prefill.head_features_at(budget).to(learner.device).float())  # (L, G, Fh)
        rows.append(learner.head_allocator(scaled, layer_budgets[r], n, learner.hparams.b_min))  # (L, G)
    return torch.stack(rows)  # (R, L, G)


def head_features_for(learner: Any, prefill: StoredPrefill, budget: int) -> Tensor | None:
    """The raw per-head signals ``(L, G, Fh)`` the planner needs at ``budget`` (None without a head allocator)."""
    return None if learner.head_allocator is None else prefill.head_features_at(budget)
