"""StreamingLLM: keep the attention sinks and the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from polykv_learn.policies import register_policy
from polykv_learn.policies.base import LayerStats, Policy


@register_policy
@dataclass
class StreamingPolicy(Policy):
    """Score = position id (more recent is better); the first ``num_sinks`` real tokens are protected.

    The top-``b`` keep set is therefore the ``num_sinks`` sinks plus the ``b - num_sinks`` most recent tokens.
    """

    name = "streaming"

    num_sinks: int = 4

    def __post_init__(self) -> None:
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")

    def scores(self, stats: LayerStats) -> Tensor:
        b, g, n = stats.keys.shape[:3]
        # float32, not the keys' dtype: bf16/fp16 cannot represent long-context position ids exactly.
        positions = stats.positions.to(stats.keys.device, torch.float32)  # (batch, n)
        return positions[:, None, :].expand(b, g, n)  # (batch, G, n)

    def protected(self, stats: LayerStats) -> Tensor:
        return (stats.positions < self.num_sinks) & stats.valid  # (batch, n)
