"""The per-head ("ragged") layout of a compressed layer whose KV heads keep different numbers of positions.

With head-wise budgets (AdaKV, arXiv:2407.11550: one budget per KV head) the dense layout of
:mod:`polykv_learn.layout` pads every KV head of a layer to the head that keeps the most; on SmolLM2 (3 KV heads)
that is about a quarter of the cache. A ragged layer instead holds each KV head ``h`` as its own tensors
``(batch, 1, slots_h + t, d)``: ``slots_h`` is the most context positions head ``h`` keeps in any row of the
batch (at batch 1 exactly its kept count: no padding at all), ``t`` the tokens appended since. A row that keeps
fewer positions in head ``h`` is right-aligned behind zero slots that are never visible, exactly as left padding.

Attention runs per KV head group (GQA, arXiv:2305.13245): the query heads ``h * H/G .. (h + 1) * H/G`` attend to head
``h``'s keys/values with head ``h``'s own visibility, through the stock sdpa/eager function
(:meth:`~polykv_learn.adapter.AttentionCall.run_base`); their outputs are concatenated over heads. The cost is ``G``
attention calls per layer and token instead of one, which is why only layers whose heads differ are held this way.

``cache_bytes``/``padding_bytes`` (re-exported by :mod:`polykv_learn.cache`) count what both layouts allocate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from polykv_learn import adapter
from polykv_learn.layout import packed_gather

__all__ = ["RaggedKV", "cache_bytes", "padding_bytes"]


@dataclasses.dataclass
class RaggedKV:
    """One layer's keys/values, one tensor pair per KV head (see the module docstring).

    ``visible[h]``: ``(batch, 1, slots_h)`` bool, the context slot holds a kept key (None: every slot does, the
    case at batch 1); ``index[h]``: ``(batch, 1, slots_h)`` long, a sliding-window layer's logical position of each
    context slot (None for a full-attention layer)."""

    keys: list[Tensor]  # G x (b, 1, slots_h + t, d)
    values: list[Tensor]  # G x (b, 1, slots_h + t, d)
    visible: list[Tensor | None]  # G x (b, 1, slots_h) bool or None
    index: list[Tensor] | None  # G x (b, 1, slots_h) long
    slots: list[int]  # slots_h of every head: its context slots (what the row that keeps the most keeps there)

    @classmethod
    def gather(
        cls, keys: Tensor, values: Tensor, index: Tensor, visible: Tensor, slots: Sequence[int], sliding: bool
    ) -> RaggedKV:
        """From the prefill ``keys``/``values`` ``(b, G, n, d)`` and the dense layout of :func:`layout.packed_layout`
        (``index``/``visible`` ``(b, G, S)``, every (row, head) right-aligned in ``S`` slots): head ``h`` takes its
        last ``slots[h]`` slots (no row of it keeps more)."""
        width = index.shape[-1]
        out = cls([], [], [], [] if sliding else None, list(slots))
        for h, s in enumerate(slots):
            idx = index[:, h : h + 1, width - s :]  # (b, 1, s)
            vis = visible[:, h : h + 1, width - s :]
            k, v = packed_gather(keys[:, h : h + 1], values[:, h : h + 1], idx, vis)  # (b, 1, s, d) x2
            out.keys.append(k)
            out.values.append(v)
            out.visible.append(None if bool(vis.all()) else vis)
            if out.index is not None:
                out.index.append(idx)
        return out

    @property
    def num_heads(self) -> int:
        return len(self.keys)

    @property
    def new_tokens(self) -> int:
        """Tokens appended after the context (the same in every head)."""
        return self.keys[0].shape[2] - self.slots[0]

    def append(self, key_states: Tensor, value_states: Tensor) -> None:
        """Append new tokens ``(b, G, q, d)`` to every head."""
        for h in range(self.num_heads):
            self.keys[h] = torch.cat([self.keys[h], key_states[:, h : h + 1]], dim=2)
            self.values[h] = torch.cat([self.values[h], value_states[:, h : h + 1]], dim=2)

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a batch-dimension operation (beam reorder, repeat, select) to every tensor."""
        self.keys = [fn(k) for k in self.keys]
        self.values = [fn(v) for v in self.values]
        self.visible = [None if v is None else fn(v) for v in self.visible]
        if self.index is not None:
            self.index = [fn(i) for i in self.index]

    def crop(self, tokens: int) -> None:
        """Drop the last ``tokens`` appended tokens of every head (never context slots)."""
        if not 0 <= tokens <= self.new_tokens:
            raise ValueError(f"can crop at most the {self.new_tokens} tokens generated after the prefill, not {tokens}")
        self.keys = [k[:, :, : k.shape[2] - tokens] for k in self.keys]
        self.values = [v[:, :, : v.shape[2] - tokens] for v in self.values]

    # --- attention ----------------------------------------------------------------------------------------------
    def attend(self, call: adapter.AttentionCall, context_length: int, logical_length: int) -> Tensor:
        """Attention of ``call``'s queries ``(b, H, q, d)`` over every head's own keys -> ``(b, q, H, d)``.

        Context slot ``j`` of head ``h`` is visible where ``visible[h]`` says so (and, in a sliding layer, while
        transformers' mask shows its logical position ``index[h]``); the new keys as transformers' mask shows them.
        At batch 1 of a full-attention layer a single query needs no mask at all (every key is visible)."""
        query = call.query
        b, heads, q_len, _ = query.shape
        g = self.num_heads
        group = heads // g
        needs_mask = q_len > 1 or self.index is not None or any(v is not None for v in self.visible)
        if not needs_mask:
            bare = dataclasses.replace(call, mask=None)
            outs = [
                bare.run_base(query[:, h * group : (h + 1) * group], self.keys[h], self.values[h], None)
                for h in range(g)
            ]
            return torch.cat(outs, dim=2)
        visible_logical = call.visible(logical_length)  # (b, q, logical)
        new_visible = visible_logical[:, None, :, context_length:]  # (b, 1, q, t)
        outs = []
        for h in range(g):
            slots = self.slots[h]
            ctx = self.visible[h]
            ctx = (
                torch.ones(b, 1, q_len, slots, dtype=torch.bool, device=query.device)
                if ctx is None
                else ctx[:, :, None, :].expand(b, 1, q_len, slots)
            )
            if self.index is not None:  # sliding window: a kept key is seen while transformers' mask shows it
                in_mask = visible_logical[:, None, :, :context_length]  # (b, 1, q, n)
                ctx = ctx & in_mask.gather(3, self.index[h][:, :, None, :].expand(b, 1, q_len, slots))
            visible = torch.cat([ctx, new_visible], dim=-1)  # (b, 1, q, slots_h + t), broadcast over the group
            outs.append(call.run_base(query[:, h * group : (h + 1) * group], self.keys[h], self.values[h], visible))
        return torch.cat(outs, dim=2)  # (b, q, H, d)

    # --- the dense view and memory ------------------------------------------------------------------------------
    def padded(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The dense layout of the same content (a copy): keys/values ``(b, G, S + t, d)`` with every head
        right-aligned in ``S = max slots_h`` context slots, ``visible`` ``(b, G, S)``, ``index`` ``(b, G, S)`` or
        None. For readers that need one tensor per layer (a fork batch, tests); the cache never holds it."""
        t, width = self.new_tokens, max(self.slots)
        b, _, _, d = self.keys[0].shape
        keys = self.keys[0].new_zeros(b, self.num_heads, width + t, d)
        values = self.values[0].new_zeros(b, self.num_heads, width + t, d)
        visible = torch.zeros(b, self.num_heads, width, dtype=torch.bool, device=keys.device)
        index = None if self.index is None else torch.zeros_like(visible, dtype=torch.long)
        for h in range(self.num_heads):
            start = width - self.slots[h]
            keys[:, h, start:] = self.keys[h][:, 0]
            values[:, h, start:] = self.values[h][:, 0]
            visible[:, h, start:] = True if self.visible[h] is None else self.visible[h][:, 0]
            if index is not None:
                index[:, h, start:] = self.index[h][:, 0]
        return keys, values, visible, index

    def nbytes(self) -> int:
        """Bytes of the key and value tensors held."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def padding_bytes(self) -> int:
        """Bytes of the context slots never visible (rows that keep fewer positions than their head's longest)."""
        total = 0
        for k, v, vis in zip(self.keys, self.values, self.visible, strict=True):
            if vis is not None:
                total += int((~vis).sum()) * k.shape[-1] * (k.element_size() + v.element_size())
        return total


def padding_bytes(cache: Cache) -> int:
    """Bytes of the key and value slots ``cache`` holds but never shows to attention (included in
    :func:`cache_bytes`): a dense layer pads its rows and KV heads to the one that keeps the most
    (:mod:`polykv_learn.layout`), a ragged layer only the rows of each head (:class:`RaggedKV`)."""
    total = 0
    for layer in cache.layers:
        ragged = getattr(layer, "ragged", None)
        if isinstance(ragged, RaggedKV):
            total += ragged.padding_bytes()
            continue
        visible = getattr(layer, "context_visible", None)  # (batch, G, slots) bool
        if isinstance(visible, Tensor):
            slots = int((~visible).sum())
            total += slots * layer.keys.shape[-1] * (layer.keys.element_size() + layer.values.element_size())
    return total


def cache_bytes(cache: Cache) -> int:
    """Bytes of key and value tensors actually held by ``cache`` (all layers), as allocated: in a batch whose rows
    keep different numbers of positions, the padding slots of the shorter rows count too."""
    total = 0
    for layer in cache.layers:
        ragged = getattr(layer, "ragged", None)
        if isinstance(ragged, RaggedKV):
            total += ragged.nbytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total
