"""Layer signals: what the router and the allocator see of one layer (design §5).

Every feature is computed from one layer's prefill statistics (:class:`~polykv_learn.policies.LayerStats`) at
cost ``O(w * n)`` (plus the ``O(n log n)`` sorts of the keep sets); nothing ``n x n`` is ever formed.
Features are standardised with a :class:`FeatureScaler` whose statistics are stored in the artifact.

References: the entropy and temporal-variance signals follow CAKE (Qin et al., arXiv:2503.12491); sink and
recent mass follow StreamingLLM (Xiao et al., arXiv:2309.17453); keep-set overlaps compare the policies of
``polykv_learn.policies`` (PolyKV, arXiv:2606.15157, routes on such signals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, ClassVar

import torch
from torch import Tensor

from polykv_learn.kvzip_global import check_allocation_prior
from polykv_learn.policies import check_policy_name, get_policy, keep_indices
from polykv_learn.policies.base import LayerStats

__all__ = [
    "BASE_FEATURE_NAMES",
    "DEFAULT_OVERLAP_POLICIES",
    "FEATURE_NAMES",
    "FeatureScaler",
    "NUM_SINKS",
    "feature_names",
    "layer_features",
]

#: number of leading real tokens counted as attention sinks
NUM_SINKS = 4

#: policies whose pairwise keep-set overlaps are features by default
DEFAULT_OVERLAP_POLICIES: tuple[str, ...] = ("snapkv", "streaming", "tova", "knorm")

_HEAD = [
    "entropy",  # mean over heads and window queries of H(attention) / log(n_valid)
    "sink_mass",  # attention mass on the first NUM_SINKS real positions (mean over heads and window queries)
    "recent_mass",  # attention mass on the last w positions (the observation window itself)
    "coverage@0.5B",  # mass of the top-B/2 positions of the head- and query-averaged window attention
    "coverage@1B",  # same at k = B
    "coverage@2B",  # same at k = 2B (k capped at n)
]
# CAKE: sum over positions of the variance across window queries (mean over heads)
_TEMPORAL = ["temporal_variance"]
_TAIL = [
    "key_norm_spread",  # std / mean of the key L2 norms over real positions (mean over KV heads)
    "depth",  # relative depth l / (L - 1)
    "log_n",  # log of the number of real context positions
    "budget_ratio",  # B / n_valid, capped at 1
]

#: the features that do not depend on the overlap policies, in output order (overlaps sit after the variance)
BASE_FEATURE_NAMES: list[str] = _HEAD + _TEMPORAL + _TAIL


def _check_overlap_policies(overlap_policies: Sequence[str]) -> tuple[str, ...]:
    if isinstance(overlap_policies, str):
        raise ValueError(f"overlap_policies must be a sequence of policy names, got {overlap_policies!r}")
    names = tuple(check_policy_name(p) for p in overlap_policies)
    if len(set(names)) != len(names):
        raise ValueError(f"overlap_policies has duplicates: {list(names)}; give each policy once")
    return names


def feature_names(
    overlap_policies: Sequence[str] = DEFAULT_OVERLAP_POLICIES, allocation_prior: str | None = None
) -> list[str]:
    """Names of the layer signals: the columns of :func:`layer_features` (overlap columns are ``overlap:p|q`` for
    every pair ``p`` before ``q`` in ``overlap_policies``), then the allocation prior's column when there is one
    (:mod:`polykv_learn.kvzip_global`: computed across layers, appended by the caller)."""
    names = _check_overlap_policies(overlap_policies)
    overlaps = [f"overlap:{p}|{q}" for p, q in combinations(names, 2)]
    prior = [check_allocation_prior(allocation_prior)] if allocation_prior else []
    return _HEAD + _TEMPORAL + overlaps + _TAIL + prior


#: feature names for the default overlap policies
FEATURE_NAMES: list[str] = feature_names(DEFAULT_OVERLAP_POLICIES)


def _keep_mask(policy: str, stats: LayerStats, budget: int, ranks: Mapping[str, Tensor] | None = None) -> Tensor:
    """Bool ``(batch, G, n)`` mask of the positions ``policy`` keeps at ``budget``.

    ``ranks`` (policy -> ``(batch, G, n)`` ranks from :func:`~polykv_learn.policies.keep_ranks`) skips the sort:
    the keep set is exactly the positions of rank ``< budget``."""
    if ranks is not None and policy in ranks:
        return ranks[policy] < budget
    idx = keep_indices(get_policy(policy), stats, budget)  # (batch, G, k)
    mask = torch.zeros(stats.keys.shape[:3], dtype=torch.bool, device=idx.device)  # (batch, G, n)
    return mask.scatter_(-1, idx, True)


def check_signal_args(stats: LayerStats, budget: int, num_layers: int) -> int:
    """The one-line checks shared by the layer and per-head signals: ``budget`` a positive integer (returned as
    ``int``), ``num_layers`` a positive integer with ``stats.layer_idx`` inside it."""
    if isinstance(budget, bool) or int(budget) != budget or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    budget = int(budget)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if not 0 <= stats.layer_idx < num_layers:
        raise ValueError(f"stats.layer_idx={stats.layer_idx} is outside [0, num_layers={num_layers})")
    return budget


def layer_features(
    stats: LayerStats,
    budget: int,
    overlap_policies: Sequence[str],
    num_layers: int,
    ranks: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Signals of one layer for every batch element: ``(batch, F)`` float32, columns as in
    :func:`feature_names` ``(overlap_policies)``. ``ranks`` optionally gives each overlap policy's precomputed
    ranks (``(batch, G, n)``), which makes features at many budgets cheap.

    ``budget`` is the average budget ``B``; ``num_layers`` is ``L`` (for the relative depth
    ``stats.layer_idx / (L - 1)``, 0 when ``L == 1``).
    """
    budget = check_signal_args(stats, budget, num_layers)
    overlaps = _check_overlap_policies(overlap_policies)

    free = stats.memo("layer_features", lambda: _budget_free_signals(stats))
    n_valid, n = free["n_valid"], stats.context_length

    # Top-k coverage of the averaged attention at k = B/2, B, 2B.
    top = free["top"]  # (batch, n)
    coverage = [top[:, min(max(k, 1), n) - 1] for k in (budget // 2, budget, 2 * budget)]  # 3 x (batch,)

    # Jaccard overlap of the keep sets of each pair of policies at budget B, averaged over KV heads.
    device = top.device
    masks = {p: _keep_mask(p, stats, budget, ranks).to(device) for p in overlaps}  # p -> (batch, G, n)
    jaccard = []
    for p, q in combinations(overlaps, 2):
        inter = (masks[p] & masks[q]).sum(dim=-1).float()  # (batch, G)
        union = (masks[p] | masks[q]).sum(dim=-1).float().clamp_min(1)  # (batch, G)
        jaccard.append((inter / union).mean(dim=-1))  # (batch,)

    batch = top.shape[0]
    depth = torch.full((batch,), stats.layer_idx / max(num_layers - 1, 1), device=device)  # (batch,)
    budget_ratio = (budget / n_valid).clamp_max(1.0)  # (batch,)

    columns = [free["entropy"], free["sink_mass"], free["recent_mass"], *coverage, free["temporal"], *jaccard]
    columns += [free["spread"], depth, free["log_n"], budget_ratio]
    return torch.stack(columns, dim=-1).float()  # (batch, F)


def _budget_free_signals(stats: LayerStats) -> dict[str, Tensor]:
    """The signals of :func:`layer_features` that do not depend on the budget (each ``(batch,)``, ``top``
    ``(batch, n)``), computed once per layer statistics."""
    attn = stats.window_attn.float()  # (batch, H, w, n)
    valid = stats.valid.to(attn.device)  # (batch, n)
    _, _, w, n = attn.shape
    n_valid = valid.sum(dim=-1).clamp_min(1).float()  # (batch,)

    # Spatial dispersion (CAKE): entropy of each window query's attention, normalised by log n_valid.
    entropy = -torch.xlogy(attn, attn).sum(dim=-1).mean(dim=(1, 2))  # (batch,)
    log_n = n_valid.log()  # (batch,)
    norm_entropy = torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), torch.zeros_like(entropy))

    # Attention mass on the sinks and on the observation window.
    sinks = (stats.positions.to(attn.device) < NUM_SINKS) & valid  # (batch, n)
    recent = (torch.arange(n, device=attn.device) >= n - w)[None, :] & valid  # (batch, n)
    mass = attn.mean(dim=(1, 2))  # (batch, n) head- and query-averaged window attention
    sink_mass = (mass * sinks).sum(dim=-1)  # (batch,)
    recent_mass = (mass * recent).sum(dim=-1)  # (batch,)

    # Cumulated sorted mass, for the top-k coverage at any k.
    top = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)  # (batch, n)

    # Temporal shift (CAKE): how much each position's attention varies across window queries.
    variance = attn.var(dim=2, correction=0).mean(dim=1)  # (batch, n)
    temporal = (variance * valid).sum(dim=-1)  # (batch,) = n_valid * mean over real positions

    # Key-norm spread over real positions.
    norms = stats.keys.float().norm(dim=-1)  # (batch, G, n)
    vmask = valid[:, None, :].float()  # (batch, 1, n)
    count = n_valid[:, None]  # (batch, 1)
    mean_norm = (norms * vmask).sum(dim=-1) / count  # (batch, G)
    std_norm = (((norms - mean_norm[..., None]) ** 2 * vmask).sum(dim=-1) / count).sqrt()  # (batch, G)
    spread = (std_norm / mean_norm.clamp_min(1e-12)).mean(dim=-1)  # (batch,)
    return {
        "n_valid": n_valid,
        "entropy": norm_entropy,
        "log_n": log_n,
        "sink_mass": sink_mass,
        "recent_mass": recent_mass,
        "top": top,
        "temporal": temporal,
        "spread": spread,
    }


@dataclass
class FeatureScaler:
    """Standardisation ``(x - mean) / std``, statistics fitted on training features (std floored at 1e-6)."""

    mean: Tensor | None = None  # (F,)
    std: Tensor | None = None  # (F,)

    MIN_STD: ClassVar[float] = 1e-6

    def fit(self, x: Tensor) -> FeatureScaler:
        """Fit on ``x`` (N, F) (any leading shape is flattened); returns ``self``."""
        if x.ndim < 2 or x.shape[-1] == 0 or x.numel() == 0:
            raise ValueError(f"fit needs features of shape (N, F) with N, F >= 1, got {tuple(x.shape)}")
        flat = x.detach().reshape(-1, x.shape[-1]).double()  # (N, F)
        if not torch.isfinite(flat).all():
            raise ValueError("fit got non-finite features (nan or inf)")
        self.mean = flat.mean(dim=0).float()
        self.std = flat.std(dim=0, correction=0).clamp_min(self.MIN_STD).float()
        return self

    def _check(self, x: Tensor) -> None:
        if self.mean is None or self.std is None:
            raise ValueError("FeatureScaler is not fitted; call fit(x) or load it with from_dict")
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"scaler was fitted on {self.mean.shape[0]} features, got {x.shape[-1]}")

    def transform(self, x: Tensor) -> Tensor:
        """``(..., F) -> (..., F)`` standardised, in the dtype of ``x``."""
        self._check(x)
        return (x - self.mean.to(x)) / self.std.to(x)

    def inverse_transform(self, x: Tensor) -> Tensor:
        self._check(x)
        return x * self.std.to(x) + self.mean.to(x)

    def to_dict(self) -> dict[str, list[float]]:
        if self.mean is None or self.std is None:
            raise ValueError("FeatureScaler is not fitted; nothing to save")
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureScaler:
        if "mean" not in data or "std" not in data:
            raise ValueError(f"scaler dict needs keys 'mean' and 'std', got {sorted(data)}")
        mean = torch.tensor(data["mean"], dtype=torch.float32)
        std = torch.tensor(data["std"], dtype=torch.float32)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(f"scaler mean and std must be 1-D, equal length; got {mean.shape}, {std.shape}")
        return cls(mean=mean, std=std.clamp_min(cls.MIN_STD))
