"""Many compressed forks of one prefill decoded as one batch: shared linear layers, attention per group.

A decode step of a 135M model costs mostly its linear layers, whose matrix products are cheaper per row at 32-64
rows than at 8 (``benchmarks/eval_speed.py`` measures the batching settings against each other). Attention,
however, runs over each row's own compressed keys, whose lengths differ from plan to plan (a uniform B=128 next
to a learned plan keeping whole layers): one padded tensor for all rows would multiply attention time and memory.
:class:`ForkBatchCache` therefore runs every fork through the model as one batch while each layer keeps its rows
in **groups** of similar lengths (the caller orders the forks by size): a group is padded only to its own longest
row, and attention runs group by group, each with its own mask.

Other savings over a concatenating cache, none of which changes a result:

- each group's keys/values live in a buffer with room for the tokens still to come, so an appended token is
  written in place instead of re-concatenating the whole cache every step; :meth:`rewind` (dropping the
  teacher-forced answer before decoding) only moves the length back;
- :meth:`keep_rows` drops finished rows (their answer is complete), so later steps only compute the live rows.

The forks themselves are real :class:`~polykv_learn.cache.CompressedCache` objects compressed with each method's
plan; this cache only copies their kept keys/values (it never holds the shared prefill's tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache

__all__ = ["ForkBatchCache", "fork_of"]


def fork_of(shared: CompressedCache, model: PreTrainedModel) -> CompressedCache:
    """A cache whose layers reference ``shared``'s prefill K/V and statistics (no copy), ready to be compressed."""
    fork = CompressedCache(model, capture=shared.capture_options)
    for src, dst in zip(shared.layers, fork.layers, strict=True):
        dst.keys, dst.values, dst.stats = src.keys, src.values, src.stats
        dst.sliding_window = src.sliding_window  # a sliding layer compresses within its window (cache.py)
        dst.is_initialized, dst.device = True, src.keys.device
        dst.logical_length = dst.context_length = src.context_length
    return fork


@dataclass
class _Group:
    """Rows ``start .. start + rows`` of the batch in one layer: context padded to ``context`` slots."""

    keys: Tensor  # (rows, G, capacity, d); slots [0, context) kept context (maybe padding), then new tokens
    values: Tensor  # (rows, G, capacity, d)
    visible: Tensor  # (rows, G, context) bool: the context slot holds a kept key (not padding)
    context: int  # padded context slots
    start: int = 0  # first batch row of the group
    # (rows, G, context) long: a sliding layer's logical context index of each slot (None: a full-attention layer)
    index: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.keys.shape[0]


class ForkBatchLayer(DynamicLayer):
    """One layer of a :class:`ForkBatchCache`: groups of rows with their own padded context (see the module)."""

    def __init__(self, layer_idx: int, groups: list[_Group], context_length: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.groups = groups
        self.context_length = context_length  # logical length of the prefill
        self.logical_length = context_length  # positions seen (context + new tokens), evicted ones included
        self.new_tokens = 0  # tokens appended after the context (the same for every row)
        self.is_initialized = True
        self.device = groups[0].keys.device

    # --- transformers' cache-layer protocol ---------------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        q = key_states.shape[-2]  # key_states: (batch, G, q, d)
        for group in self.groups:
            end = group.context + self.new_tokens + q
            if end > group.keys.shape[-2]:  # out of room (the caller reserved too little): grow
                group.keys, group.values = _grow(group.keys, end + 16), _grow(group.values, end + 16)
            rows = slice(group.start, group.start + group.rows)
            group.keys[:, :, end - q : end] = key_states[rows]
            group.values[:, :, end - q : end] = value_states[rows]
        self.new_tokens += q
        self.logical_length += q
        adapter.announce(self.layer_idx, self)
        return key_states, value_states  # attention reads the groups (see attend), not these

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    # --- attention ----------------------------------------------------------------------------------------------
    def attend(self, call: adapter.AttentionCall) -> Tensor:
        """Attention of each group's queries over its own keys; outputs (batch, q, H, d) in batch order."""
        q_len = call.query.shape[2]
        visible_logical = call.visible(self.logical_length)  # (batch, q, logical)
        h = call.query.shape[1]
        outputs = []
        for group in self.groups:
            rows = slice(group.start, group.start + group.rows)
            r, g = group.rows, group.keys.shape[1]
            length = group.context + self.new_tokens
            new_visible = visible_logical[rows, None, :, self.context_length :].expand(r, g, q_len, -1)
            ctx_visible = group.visible[:, :, None, :].expand(r, g, q_len, -1)
            if group.index is not None:  # sliding window: a kept key is seen while transformers' mask shows it
                in_mask = visible_logical[rows, None, :, : self.context_length].expand(r, g, q_len, -1)
                ctx_visible = ctx_visible & in_mask.gather(3, group.index[:, :, None, :].expand(r, g, q_len, -1))
            visible = torch.cat([ctx_visible, new_visible], dim=-1).repeat_interleave(h // g, dim=1)  # (r, H, q, kv)
            keys, values = group.keys[:, :, :length], group.values[:, :, :length]
            outputs.append(call.run_base(call.query[rows], keys, values, visible))  # (r, q, H, d)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    # --- batch edits --------------------------------------------------------------------------------------------
    def rewind(self, tokens: int) -> None:
        if tokens > self.new_tokens:
            raise ValueError(f"cannot rewind {tokens} tokens: only {self.new_tokens} were appended")
        self.new_tokens -= tokens
        self.logical_length -= tokens

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Keep only the batch rows ``keep`` (increasing), renumbered 0..len(keep)-1."""
        kept, start = [], 0
        wanted = set(keep)
        for group in self.groups:
            local = [i - group.start for i in range(group.start, group.start + group.rows) if i in wanted]
            if not local:
                continue  # the whole group finished: dropped without a copy
            if len(local) < group.rows:
                index = torch.tensor(local, device=group.keys.device)
                group.keys = group.keys.index_select(0, index)
                group.values = group.values.index_select(0, index)
                group.visible = group.visible.index_select(0, index)
                if group.index is not None:
                    group.index = group.index.index_select(0, index)
            group.start = start
            start += group.rows
            kept.append(group)
        self.groups = kept


class ForkBatchCache(Cache):
    """The compressed ``forks`` of one prefill (each batch size 1) as one batch, in their order; consecutive forks
    form groups of at most ``group_size`` rows; each group has room for ``reserve`` tokens after the context."""

    def __init__(self, model: PreTrainedModel, forks: Sequence[CompressedCache], group_size: int, reserve: int):
        if not forks:
            raise ValueError("no forks to batch")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        num_layers = adapter.model_dims(model).num_layers
        context_length = forks[0].layers[0].context_length
        layers = []
        for idx in range(num_layers):
            groups = []
            for start in range(0, len(forks), group_size):
                rows = [f.layers[idx] for f in forks[start : start + group_size]]
                if any(r.logical_length != r.context_length or r.context_length != context_length for r in rows):
                    raise ValueError("forks must be compressed prefills of one context, with nothing appended")
                groups.append(_pack(rows, start, reserve))
            layers.append(ForkBatchLayer(idx, groups, context_length))
        super().__init__(layers=layers)
        adapter.install_polykv_attention(model)

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.layers[0].groups)

    def rewind(self, tokens: int) -> None:
        """Forget the last ``tokens`` appended tokens of every row (e.g. a teacher-forced answer)."""
        for layer in self.layers:
            layer.rewind(tokens)

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Keep only the batch rows ``keep`` (distinct, increasing); the next forward feeds ``len(keep)`` rows."""
        keep = list(keep)
        if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= self.rows:
            raise ValueError(f"keep must be distinct increasing rows in [0, {self.rows}), got {keep}")
        for layer in self.layers:
            layer.keep_rows(keep)


def _pack(rows: Sequence, start: int, reserve: int) -> _Group:
    """One group from compressed fork layers (batch 1 each): padded to the longest kept context (a ragged fork layer,
    one tensor per KV head, is read in its dense view: :meth:`~polykv_learn.cache.CompressedLayer.padded`)."""
    held = [r.padded() for r in rows]  # (keys, values, context_visible, context_index) per row
    context = max(k.shape[-2] for k, *_ in held)
    _, g, _, d = held[0][0].shape
    keys = held[0][0].new_zeros(len(rows), g, context + reserve, d)
    values = held[0][1].new_zeros(len(rows), g, context + reserve, d)
    visible = torch.zeros(len(rows), g, context, dtype=torch.bool, device=keys.device)
    sliding = rows[0].sliding_window is not None
    index = torch.zeros(len(rows), g, context, dtype=torch.long, device=keys.device) if sliding else None
    for i, (k, v, vis, idx) in enumerate(held):
        length = k.shape[-2]
        keys[i, :, :length] = k[0]
        values[i, :, :length] = v[0]
        visible[i, :, :length] = True if vis is None else vis[0]
        if index is not None:  # an uncompressed layer's slot j is position j
            index[i, :, :length] = torch.arange(length, device=keys.device) if idx is None else idx[0]
    return _Group(keys, values, visible, context, start, index)


def _grow(buffer: Tensor, capacity: int) -> Tensor:
    """``buffer`` (rows, G, slots, d) with zeros appended up to ``capacity`` slots."""
    extra = buffer.new_zeros(*buffer.shape[:2], capacity - buffer.shape[2], buffer.shape[3])
    return torch.cat([buffer, extra], dim=2)
