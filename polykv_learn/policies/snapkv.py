"""SnapKV: attention of an observation window of the last queries, pooled over positions.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469.
Follows NVIDIA kvpress ``SnapKVPress`` (mean over window queries, 1-D average pooling, window kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from polykv_learn.policies import register_policy
from polykv_learn.policies.base import LayerStats, Policy


@register_policy
@dataclass
class SnapKVPolicy(Policy):
    """Score = mean attention of the last ``window_size`` window queries, averaged over the query heads of
    each group, then average-pooled over positions (kernel ``kernel_size``, stride 1, zero padding counted).
    The observation window (the last ``window_size`` positions) is protected."""

    name = "snapkv"

    window_size: int | None = None  # None: every window query of the stats
    kernel_size: int = 5

    def __post_init__(self) -> None:
        if self.window_size is not None and self.window_size < 1:
            raise ValueError(f"window_size must be >= 1 or None, got {self.window_size}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {self.kernel_size}")

    def _window(self, stats: LayerStats) -> int:
        if self.window_size is None:
            return stats.window_size
        if self.window_size > stats.window_size:
            raise ValueError(
                f"snapkv window_size={self.window_size} exceeds the {stats.window_size} captured window queries"
            )
        return self.window_size

    def scores(self, stats: LayerStats) -> Tensor:
        w = self._window(stats)
        attn = stats.window_attn[:, :, -w:, :].mean(dim=2)  # (batch, H, n)
        attn = stats.group_mean(attn)  # (batch, G, n)
        b, g, n = attn.shape
        pooled = F.avg_pool1d(
            attn.reshape(b * g, 1, n), kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1
        )  # (batch * G, 1, n)
        return pooled.reshape(b, g, n)  # (batch, G, n)

    def protected(self, stats: LayerStats) -> Tensor:
        w = self._window(stats)
        n = stats.context_length
        in_window = torch.arange(n, device=stats.valid.device) >= n - w  # (n,)
        return in_window[None, :] & stats.valid  # (batch, n)
