"""KVzip: keep what the model needs to reconstruct the context from its own cache.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv:2505.23416. After
the prefill, the model is teacher-forced on a repeat instruction followed by the context itself, attending to the
full context cache (:mod:`polykv_learn.reconstruct`); a position's score is the largest attention any query of
that pass (any head of its KV group) gives it. The first ``num_sinks`` real positions are protected (as kvpress
``KVzipPress``'s ``n_sink``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from polykv_learn.policies import register_policy
from polykv_learn.policies.base import LayerStats, Policy


@register_policy
@dataclass
class KVzipPolicy(Policy):
    """Score = ``stats.reconstruct_attn``: max over the query heads of the KV group and over the positions of the
    reconstruction pass of its softmax attention on the context position. The first ``num_sinks`` real tokens
    are protected."""

    name = "kvzip"
    needs_reconstruct_attn: ClassVar[bool] = True

    num_sinks: int = 4

    def __post_init__(self) -> None:
        if self.num_sinks < 0:
            raise ValueError(f"kvzip num_sinks must be >= 0, got {self.num_sinks}")

    def scores(self, stats: LayerStats) -> Tensor:
        if stats.reconstruct_attn is None:
            raise ValueError(
                "kvzip needs the context-reconstruction attention (LayerStats.reconstruct_attn is None); capture it "
                "with CaptureOptions(reconstruct=True) (the policy sets `needs_reconstruct_attn = True`)"
            )
        return stats.reconstruct_attn  # (batch, G, n)

    def protected(self, stats: LayerStats) -> Tensor:
        return (stats.positions < self.num_sinks) & stats.valid  # (batch, n)
