"""Key-norm eviction: keys with a small L2 norm draw the most attention.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", arXiv:2406.11430.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from polykv_learn.policies import register_policy
from polykv_learn.policies.base import LayerStats, Policy


@register_policy
@dataclass
class KNormPolicy(Policy):
    """Score = minus the L2 norm of the (post-RoPE) key. Nothing is protected."""

    name = "knorm"

    def scores(self, stats: LayerStats) -> Tensor:
        return -stats.keys.norm(dim=-1)  # (batch, G, n, d) -> (batch, G, n)
