"""H2O: heavy hitters by attention accumulated over every prefill query, plus the recent tokens.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
arXiv:2306.14048.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from polykv_learn.policies import register_policy
from polykv_learn.policies.base import LayerStats, Policy


@register_policy
@dataclass
class H2OPolicy(Policy):
    """Score = attention received from all prefill queries (``stats.accumulated_attn``), averaged over the
    query heads of each group. The last ``num_recent`` positions (default: the window size) are protected."""

    name = "h2o"
    needs_accumulated_attn: ClassVar[bool] = True

    num_recent: int | None = None  # None: stats.window_size

    def __post_init__(self) -> None:
        if self.num_recent is not None and self.num_recent < 0:
            raise ValueError(f"num_recent must be >= 0 or None, got {self.num_recent}")

    def scores(self, stats: LayerStats) -> Tensor:
        if stats.accumulated_attn is None:
            raise ValueError(
                "h2o needs accumulated attention (LayerStats.accumulated_attn is None); capture it with "
                "accumulated attention enabled (the policy sets `needs_accumulated_attn = True`)"
            )
        return stats.group_mean(stats.accumulated_attn)  # (batch, H, n) -> (batch, G, n)

    def protected(self, stats: LayerStats) -> Tensor:
        recent = stats.window_size if self.num_recent is None else self.num_recent
        n = stats.context_length
        is_recent = torch.arange(n, device=stats.valid.device) >= n - recent  # (n,)
        return is_recent[None, :] & stats.valid  # (batch, n)
