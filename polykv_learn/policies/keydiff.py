"""KeyDiff: keep the keys least similar to the layer's average key direction.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", arXiv:2504.15364. The anchor is the mean of the unit (L2-normalised) keys, as
in the paper (and kvpress ``KeyDiffPress``); attention-free, ``O(n d)`` per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from polykv_learn.policies import register_policy
from polykv_learn.policies.base import LayerStats, Policy


@register_policy
@dataclass
class KeyDiffPolicy(Policy):
    """Score = minus the cosine similarity of the (post-RoPE) key with the anchor of its layer and KV head, the
    mean of the unit keys over the real (non-padding) context positions. Protected: the first ``num_sinks`` real
    positions and the last ``num_recent`` positions (default: the observation window, as SnapKV and H2O)."""

    name = "keydiff"

    num_sinks: int = 4
    num_recent: int | None = None  # None: stats.window_size

    def __post_init__(self) -> None:
        if self.num_sinks < 0:
            raise ValueError(f"keydiff num_sinks must be >= 0, got {self.num_sinks}")
        if self.num_recent is not None and self.num_recent < 0:
            raise ValueError(f"keydiff num_recent must be >= 0 or None, got {self.num_recent}")

    def scores(self, stats: LayerStats) -> Tensor:
        keys = stats.keys.to(torch.promote_types(stats.keys.dtype, torch.float32))  # (batch, G, n, d)
        unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (batch, G, n, d)
        valid = stats.valid.to(keys.device, keys.dtype)[:, None, :, None]  # (batch, 1, n, 1)
        anchor = (unit * valid).sum(dim=2) / valid.sum(dim=2).clamp_min(1)  # (batch, G, d)
        anchor = anchor / anchor.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (batch, G, d)
        return -torch.einsum("bgnd,bgd->bgn", unit, anchor)  # (batch, G, n): -cos(k_j, anchor)

    def protected(self, stats: LayerStats) -> Tensor:
        recent = stats.window_size if self.num_recent is None else self.num_recent
        n = stats.context_length
        is_recent = torch.arange(n, device=stats.valid.device) >= n - recent  # (n,)
        return ((stats.positions < self.num_sinks) | is_recent[None, :]) & stats.valid  # (batch, n)
