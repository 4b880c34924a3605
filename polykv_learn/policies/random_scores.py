"""Seeded random scores: a control baseline, never routed to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from polykv_learn.policies import register_policy
from polykv_learn.policies.base import LayerStats, Policy


@register_policy
@dataclass
class RandomPolicy(Policy):
    """Score = uniform random, from a generator seeded with ``seed * 100003 + layer_idx`` (deterministic and
    independent of the global RNG). Nothing is protected."""

    name = "random"
    routable: ClassVar[bool] = False

    seed: int = 0

    def scores(self, stats: LayerStats) -> Tensor:
        b, g, n = stats.keys.shape[:3]
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 100003 + stats.layer_idx)
        scores = torch.rand(b, g, n, generator=generator)  # (batch, G, n) on CPU
        return scores.to(stats.keys.device)
