"""What every eviction policy sees (``LayerStats``), what it returns, and how a keep set is chosen from it.

A policy scores each ``(KV head, context position)`` of one layer from information a real prefill already has
(keys, values, the queries of an observation window). The keep set of a KV head is the ``b`` best positions,
with the policy's protected positions (sinks, observation window) forced in, and exactly ``b`` kept.

Ordering rule (deterministic, used by both the hard keep set and the soft ranks of training):
valid before padding, protected before unprotected, higher score first, and on ties the more recent position.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class LayerStats:
    """Everything one layer's prefill offers to a scorer.

    Shapes use ``batch``, ``G`` KV heads, ``H`` query heads, ``n`` context positions, ``w`` window queries,
    ``T`` future positions, ``d`` head dim."""

    keys: Tensor  # (batch, G, n, d) post-RoPE keys
    values: Tensor  # (batch, G, n, d)
    window_queries: Tensor  # (batch, H, w, d) post-RoPE queries of the last w context positions
    window_attn: Tensor  # (batch, H, w, n) softmax attention of the window queries (causal, padding masked)
    valid: Tensor  # (batch, n) bool: False for padding
    positions: Tensor  # (batch, n) long: original position ids (0 = first real token)
    scaling: float  # softmax scale of the layer (1/sqrt(d) for the supported models)
    window_cos: Tensor  # (batch, w, d) RoPE cos of the window positions
    window_sin: Tensor  # (batch, w, d) RoPE sin of the window positions
    future_cos: Tensor  # (batch, T, d) RoPE cos of the T positions after the context
    future_sin: Tensor  # (batch, T, d) RoPE sin of the T positions after the context
    accumulated_attn: Tensor | None = None  # (batch, H, n) attention summed over all prefill queries (H2O)
    # (batch, G, n) KVzip: max attention of the context-reconstruction pass's queries on each position
    reconstruct_attn: Tensor | None = None
    layer_idx: int = 0
    # the layer's attention window W (a sliding-window layer: a query sees the W - 1 keys before it), None: full
    sliding_window: int | None = None
    # results derived from these statistics (see memo); statistics are never modified, so they stay valid
    _memo: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def group_size(self) -> int:
        return self.window_queries.shape[1] // self.keys.shape[1]

    @property
    def context_length(self) -> int:
        return self.keys.shape[2]

    @property
    def window_size(self) -> int:
        return self.window_queries.shape[2]

    @property
    def in_window(self) -> Tensor:
        """``(n,)`` bool: the context positions a later token can still see, the last ``W - 1`` of a sliding layer
        (every position of a full-attention layer)."""
        n = self.context_length
        index = torch.arange(n, device=self.valid.device)
        if self.sliding_window is None:
            return torch.ones(n, dtype=torch.bool, device=self.valid.device)
        return index >= n + 1 - self.sliding_window

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per ``key`` for these statistics: one prefill evaluated at many budgets
        (an evaluation sweep, the features of every budget) sorts each policy's scores once."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def group_mean(self, per_query_head: Tensor) -> Tensor:
        """Average a ``(batch, H, ...)`` tensor over the heads of each GQA group -> ``(batch, G, ...)``."""
        b, h = per_query_head.shape[:2]
        g = self.num_kv_heads
        return per_query_head.reshape(b, g, h // g, *per_query_head.shape[2:]).mean(dim=2)


class Policy:
    """Base class of a scorer. Subclasses set ``name`` and implement :meth:`scores`."""

    name: ClassVar[str] = ""
    #: whether the scorer needs ``LayerStats.accumulated_attn`` (costly: attention of every prefill query)
    needs_accumulated_attn: ClassVar[bool] = False
    #: whether the scorer needs ``LayerStats.reconstruct_attn`` (costly: a second pass over the whole context)
    needs_reconstruct_attn: ClassVar[bool] = False
    #: whether the router may pick it (``random`` is a control only)
    routable: ClassVar[bool] = True

    def scores(self, stats: LayerStats) -> Tensor:
        """Return ``(batch, G, n)`` scores; higher means keep. Padding positions may hold anything."""
        raise NotImplementedError

    def protected(self, stats: LayerStats) -> Tensor | None:
        """Return a ``(batch, n)`` bool mask of positions forced into the keep set, or None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def order_positions(policy: Policy, stats: LayerStats) -> Tensor:
    """Positions of each KV head from best to worst under ``policy``: ``(batch, G, n)`` long indices (computed
    once per policy and statistics, then reused; do not modify the result)."""
    # a dataclass policy is known by its options, another by its address (kept alive by the memo)
    stored, order = stats.memo(("order", type(policy), repr(policy)), lambda: (policy, _order_positions(policy, stats)))
    return order if stored == policy else _order_positions(policy, stats)


def _order_positions(policy: Policy, stats: LayerStats) -> Tensor:
    scores = policy.scores(stats).float()  # (batch, G, n)
    b, g, n = scores.shape
    protected = policy.protected(stats)
    protected = torch.zeros(b, n, dtype=torch.bool, device=scores.device) if protected is None else protected
    valid = stats.valid.to(scores.device)
    # a sliding layer's positions out of its window come after every position in it (no later token sees them)
    candidate = valid & stats.in_window.to(scores.device)[None, :]
    # Sort by the least significant key first; stable sorts keep earlier orderings on ties.
    order = torch.arange(n - 1, -1, -1, device=scores.device).expand(b, g, n)  # recent first on ties
    order = order.gather(-1, scores.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    keys = (protected & candidate, candidate, valid) if stats.sliding_window is not None else (protected & valid, valid)
    for key in keys:  # protected before unprotected, in the window before out of it, then valid before padding
        k = key[:, None, :].expand(b, g, n).gather(-1, order).to(torch.int8)
        order = order.gather(-1, k.argsort(dim=-1, descending=True, stable=True))
    return order


def keep_ranks(policy: Policy, stats: LayerStats) -> Tensor:
    """Rank of every position under ``policy`` (0 = kept first): ``(batch, G, n)`` long."""
    order = order_positions(policy, stats)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def keep_indices(policy: Policy, stats: LayerStats, budget: int) -> Tensor:
    """The kept positions of each KV head, ascending: ``(batch, G, min(budget, n))`` long.

    Exactly ``min(budget, n)`` positions per KV head; protected positions come first (if there are more
    protected positions than the budget, the best-scoring of them are kept, recency breaking ties).
    """
    if budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget}")
    n = stats.context_length
    order = order_positions(policy, stats)
    return order[..., : min(budget, n)].sort(dim=-1).values
