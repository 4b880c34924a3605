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
    independent of the global RNG), drawn per (KV head, position id): a sequence gets the same scores alone or
    left-padded in a batch. Nothing is protected."""

    name = "random"
    routable: ClassVar[bool] = False

    seed: int = 0

    def scores(self, stats: LayerStats) -> Tensor:
        b, g, n = stats.keys.shape[:3]
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 100003 + stats.layer_idx)
        positions = stats.positions.detach().cpu().long().clamp(min=0)  # (batch, n)
        # (positions, G): the draw for a position id does not depend on how many positions are drawn
        table = torch.rand(int(positions.max()) + 1, g, generator=generator)
        scores = table[positions].permute(0, 2, 1)  # (batch, G, n)
        return scores.to(stats.keys.device)
