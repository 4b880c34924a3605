"""TOVA: keep the tokens the last query attends to most.

Oren et al., "Transformers are Multi-State RNNs" (Token Omission Via Attention), arXiv:2401.06104.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from polykv_learn.policies import register_policy
from polykv_learn.policies.base import LayerStats, Policy


@register_policy
@dataclass
class TOVAPolicy(Policy):
    """Score = attention of the last window query, averaged over the query heads of each group.
    The last position (the query's own token) is protected."""

    name = "tova"

    def scores(self, stats: LayerStats) -> Tensor:
        last = stats.window_attn[:, :, -1, :]  # (batch, H, n)
        return stats.group_mean(last)  # (batch, G, n)

    def protected(self, stats: LayerStats) -> Tensor:
        n = stats.context_length
        is_last = torch.arange(n, device=stats.valid.device) == n - 1  # (n,)
        return is_last[None, :] & stats.valid  # (batch, n)
