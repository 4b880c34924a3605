"""A real compressed KV cache: prefill with full attention, then physically evict each layer to its keep set.

``CompressedCache`` is a transformers ``Cache``: pass it to ``model(...)`` or ``model.generate(...)``. Each layer
holds only its kept context keys/values (layers may differ in length) plus what is generated afterwards. Positions
continue from the original context length: ``get_seq_length`` reports the *logical* length, so transformers
computes the same position ids as with a full cache, and the attention wrapper in :mod:`polykv_learn.adapter`
builds each layer's own mask (kept context keys are visible unless they are padding; new keys are causal).

Three ways to decide what to keep:
- ``plan=Plan(...)`` (static): a layer evicts as soon as its own prefill attention is done;
- ``planner=fn`` (adaptive): ``fn(stats_per_layer)`` runs as soon as the last layer's prefill attention is done
  (every layer then evicts at once, before any new token) and returns one ``Plan`` for every row of the batch or a
  list with one ``Plan`` per row; every layer keeps its statistics until then. A
  :class:`~polykv_learn.layerwise.LayerwisePlanner` plans the same way from a summary of each layer, taken as soon
  as that layer's prefill attention is done, and its statistics are dropped then (only its keys/values, its summary
  and its keep orders wait for the plan);
- neither: capture only (full cache plus every layer's scoring statistics; what the simulator uses).

Batches (left padding only). Each row is compressed as if it were alone: its keep set is chosen from its own
statistics cut to its real tokens (:func:`row_stats`), and a budget at or above the row's own length keeps the
whole row. A layer then holds every row padded to the row that keeps the most positions there: a row's kept keys
sit at the end of its slots, the slots before them hold zeros and are never visible (``context_visible``).

Layouts. A layer whose KV heads get the same number of slots holds one dense ``(batch, G, slots, d)`` tensor
(:mod:`polykv_learn.layout`). One whose heads differ (head budgets, AdaKV-style) is *ragged*: ``ragged``
(:class:`~polykv_learn.ragged.RaggedKV`) holds each KV head ``h`` as its own ``(batch, 1, slots_h, d)`` and attention
runs per KV head group, so no head is padded to another (``keys``/``values`` are None; ``padded()`` is the dense view).

One prefill per cache: ``generate`` refuses a cache that has already been prefilled (make a new one per call);
a direct ``model(...)`` forward after the prefill continues the sequence.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from polykv_learn import adapter
from polykv_learn.capture import (
    CaptureOptions,
    compute_layer_stats,
    with_accumulated_attention,
    with_reconstruct_attention,
)
from polykv_learn.layerwise import KeepOrders, LayerwisePlanner
from polykv_learn.layout import packed_gather, packed_layout, row_keeps
from polykv_learn.plan import Plan
from polykv_learn.policies import LayerStats, get_policy
from polykv_learn.ragged import RaggedKV
from polykv_learn.ragged import cache_bytes as cache_bytes  # re-exported: the public home of both
from polykv_learn.ragged import padding_bytes as padding_bytes
from polykv_learn.reconstruct import prefill_ids
from polykv_learn.reconstruct_chunked import reconstruct_layers
from polykv_learn.rows import plans_per_row, real_keys, real_length, row_stats

#: adaptive mode: batched statistics of every layer -> one Plan for every row, or one Plan per row (a
#: ``LayerwisePlanner`` is one too, and a cache given one summarises each layer as its prefill ends)
Planner = Callable[[list[LayerStats]], "Plan | Sequence[Plan]"]


class CompressedLayer(DynamicLayer):
    """One layer: keys/values ``(batch, G, len, d)``; after eviction ``len = max_row kept_row + generated``, or,
    if its KV heads keep different numbers of positions, ``ragged`` holds one tensor per head (module docstring).
    ``ragged_heads = False`` (on the class or a layer) keeps the dense layout for every layer (the reference)."""

    ragged_heads = True

    def __init__(self, owner: CompressedCache, layer_idx: int):
        super().__init__()
        # a weak reference: a strong one would make every cache a reference cycle, which only the cyclic garbage
        # collector frees, so caches with their K/V (gigabytes over an evaluation) piled up between its rare runs
        self._owner = weakref.ref(owner)
        self.layer_idx = layer_idx
        self.logical_length = 0  # positions seen (context + generated), evicted ones included
        self.context_length = 0  # logical length of the prefill (padded length in a batch)
        self.context_visible: Tensor | None = None  # (batch, G, slots) bool: the slot holds a kept real key
        # a sliding-window layer: its window W and each kept slot's logical index (batch, G, slots), by which later
        # queries see the slot only while it is in their window
        self.sliding_window: int | None = None
        self.context_index: Tensor | None = None
        self.ragged: RaggedKV | None = None  # per-head keys/values (then keys = values = None)
        self.stats: LayerStats | None = None
        # a LayerwisePlanner's cache, between the layer's prefill and the compression (the statistics are gone)
        self.summary: Any = None  # what the planner's summarize returned for this layer
        self.orders: KeepOrders | None = None  # the keep orders eviction needs
        # the statistics and, per row, the candidates whose orders wait for the reconstruction pass (KVzip)
        self.pending: tuple[LayerStats, list[frozenset[str]]] | None = None

    @property
    def owner(self) -> CompressedCache:
        owner = self._owner()
        if owner is None:
            raise RuntimeError("this cache layer outlived its CompressedCache")
        return owner

    # --- transformers' cache-layer protocol ---------------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.logical_length += key_states.shape[-2]
        adapter.announce(self.layer_idx, self)
        if self.ragged is not None:  # attend reads the heads' own tensors, not what this returns
            self.ragged.append(key_states, value_states)
            return key_states, value_states
        return super().update(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.logical_length = self.context_length = 0
        self.context_visible = self.stats = self.summary = self.orders = self.pending = self.ragged = None
        self.sliding_window = self.context_index = None

    def _map_rows(self, fn: Callable[[Tensor], Tensor]) -> None:
        """A batch-dimension operation (beam reorder, repeat, select) on everything this layer holds per row."""
        if self.ragged is not None:
            self.ragged.map_rows(fn)
        elif self.logical_length > 0:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.context_visible is not None:
            self.context_visible = fn(self.context_visible)
        if self.context_index is not None:
            self.context_index = fn(self.context_index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention), never a prefill position."""
        tokens, after = -tokens_to_remove, self.logical_length - self.context_length
        if not 0 <= tokens <= after:
            raise ValueError(
                f"crop can remove 0 to {after} tokens after the prefill, got tokens_to_remove={tokens_to_remove}"
            )
        if tokens and self.ragged is not None:
            self.ragged.crop(tokens)
        elif tokens:
            self.keys, self.values = self.keys[..., :-tokens, :], self.values[..., :-tokens, :]
        self.logical_length -= tokens

    def padded(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """keys, values ``(b, G, slots + t, d)``, ``context_visible`` and ``context_index`` in the dense layout:
        this layer's own tensors, or for a ragged layer a padded copy (:meth:`RaggedKV.padded`)."""
        if self.ragged is None:
            return self.keys, self.values, self.context_visible, self.context_index
        return self.ragged.padded()

    # --- attention ----------------------------------------------------------------------------------------------
    def attend(self, call: adapter.AttentionCall) -> Tensor:
        q_len = call.query.shape[2]
        if self.context_length == 0:  # the prefill: full attention, then record statistics (and maybe evict)
            self.context_length = self.logical_length
            if q_len != self.context_length:
                raise ValueError("a CompressedCache must start empty: the first forward is the whole prefill")
            out = call.run_base(call.query, call.key, call.value, None)
            self.owner.on_prefill(self, call)
            return out
        if self.ragged is not None:  # per-head tensors: attention per KV head group
            return self.ragged.attend(call, self.context_length, self.logical_length)
        if self.context_visible is None:  # nothing evicted: physical == logical, transformers' mask is right
            return call.run_base(call.query, call.key, call.value, None)
        visible_logical = call.visible(self.logical_length)  # (b, q, logical)
        b, h = call.query.shape[:2]
        g = self.keys.shape[1]
        new_visible = visible_logical[:, None, :, self.context_length :].expand(b, g, q_len, -1)
        ctx_visible = self.context_visible[:, :, None, :].expand(b, g, q_len, -1)
        if self.context_index is not None:  # sliding window: a kept key is seen while transformers' mask shows it
            slots = self.context_index.shape[-1]
            in_mask = visible_logical[:, None, :, : self.context_length].expand(b, g, q_len, -1)
            ctx_visible = ctx_visible & in_mask.gather(3, self.context_index[:, :, None, :].expand(b, g, q_len, slots))
        visible = torch.cat([ctx_visible, new_visible], dim=-1).repeat_interleave(h // g, dim=1)  # (b, H, q, kv)
        return call.run_base(call.query, call.key, call.value, visible)

    def evict(self, policy: str | Sequence[str], budget: int | Sequence[int | Sequence[int]]) -> None:
        """Keep ``budget`` context positions per KV head chosen by ``policy`` (a row keeps all of its real tokens
        if the budget is at least their number). One value applies to every row; a sequence gives one per row,
        each one number for all of the row's KV heads or one per KV head (head-wise budgets, :mod:`layout`)."""
        stats, orders = self.stats, self.orders
        if stats is None and orders is None:
            raise RuntimeError(f"layer {self.layer_idx} has no prefill statistics to evict with")
        if self.logical_length != self.context_length:
            raise RuntimeError("eviction happens right after the prefill, before any new token")
        batch, g, n, _ = self.keys.shape
        policies = [policy] * batch if isinstance(policy, str) else list(policy)
        budgets = list(budget) if isinstance(budget, Sequence) else [budget] * batch
        if len(policies) != batch or len(budgets) != batch:
            raise ValueError(
                f"layer {self.layer_idx}: {len(policies)} policies and {len(budgets)} budgets "
                f"for a batch of {batch} rows"
            )
        keeps, whole = row_keeps(stats, orders, policies, budgets, n, g, self.sliding_window, self.keys.device)
        index, visible = packed_layout(keeps, self.keys.device)  # (b, G, slots) x2
        if whole and index.shape[-1] == n:  # every row keeps all of itself and no slot can go: the layout stays
            self._drop_statistics()
            return
        slots = [max(row[h].shape[0] for row in keeps) for h in range(g)]  # per head: its longest row
        if self.ragged_heads and len(set(slots)) > 1:  # heads differ: each holds its own slots (ragged.py)
            sliding = self.sliding_window is not None
            self.ragged = RaggedKV.gather(self.keys, self.values, index, visible, slots, sliding)
            self.keys = self.values = None
        else:  # one dense tensor, every (row, head) padded to the longest
            self.keys, self.values = packed_gather(self.keys, self.values, index, visible)  # (b, G, slots, d) x2
            self.context_visible = visible
            self.context_index = index if self.sliding_window is not None else None
        self._drop_statistics()

    def _drop_statistics(self) -> None:
        self.stats = self.summary = self.orders = self.pending = None

    def summarize(
        self,
        planner: LayerwisePlanner,
        accumulate: Callable[[LayerStats], LayerStats] | None,
        defer_reconstruct: bool = False,
    ) -> None:
        """Keep only what ``planner`` needs of this layer (its summary, the keep orders of each row's candidate
        policies, the row alone) and drop the statistics. ``accumulate``: the statistics lack the accumulated
        attention; it adds it, called only if a candidate needs it. ``defer_reconstruct``: the reconstruction pass
        is still to come; the orders of candidates that need it wait for :meth:`finish_pending` (the statistics
        stay until then, for this layer only)."""
        stats = self.stats
        if stats is None:
            raise RuntimeError(f"layer {self.layer_idx} has no prefill statistics to summarise")
        summary = planner.summarize(stats)
        batch = stats.valid.shape[0]
        candidates = planner.candidates_of(summary, batch)
        if accumulate is not None and any(get_policy(p).needs_accumulated_attn for c in candidates for p in c):
            stats = accumulate(stats)
        waits = [p for c in candidates for p in c if defer_reconstruct and get_policy(p).needs_reconstruct_attn]
        later = [c & frozenset(waits) for c in candidates]  # per row: the candidates whose orders wait for the pass
        now = [c - w for c, w in zip(candidates, later, strict=True)]
        self.summary = summary
        self.orders = KeepOrders.of([row_stats(stats, r) for r in range(batch)], now)
        self.pending = (stats, later) if any(later) else None
        self.stats = None

    def finish_pending(self, reconstruct_attn: Tensor) -> None:
        """Add the keep orders that waited for the reconstruction pass (its attention ``(b, G, n)``)."""
        if self.pending is None:
            return
        stats, later = self.pending
        stats = with_reconstruct_attention(stats, reconstruct_attn)
        extra = KeepOrders.of([row_stats(stats, r) for r in range(stats.valid.shape[0])], later)
        self.orders = extra if self.orders is None else self.orders.merged(extra)
        self.pending = None


class CompressedCache(Cache):
    """A KV cache that evicts per layer after the prefill (see the module docstring). One cache per prefill.

    ``applied_plans``: the plan of every batch row once compressed (None before). ``applied_plan``: the fixed
    ``plan`` (static mode, also before the prefill), or after compression the plan every row got (batch 1, the
    beams of one prompt, a fixed plan, a planner that returned a single ``Plan``); if the rows of a batch got
    different plans it raises (read ``applied_plans``)."""

    def __init__(
        self,
        model: PreTrainedModel,
        plan: Plan | None = None,
        planner: Planner | None = None,
        capture: CaptureOptions | None = None,
    ):
        if plan is not None and planner is not None:
            raise ValueError("give either a fixed `plan` or an adaptive `planner`, not both")
        dims = adapter.model_dims(model)
        if plan is not None:
            plan.check_dims(dims.num_layers, dims.num_kv_heads)
        if capture is None:
            needs_h2o = plan is None or any(get_policy(p).needs_accumulated_attn for p in plan.policies)
            needs_zip = plan is None or any(get_policy(p).needs_reconstruct_attn for p in plan.policies)
            capture = CaptureOptions(accumulate=needs_h2o, reconstruct=needs_zip)
        if capture.reconstruct:
            adapter.track_input_ids(model)  # the reconstruction pass repeats the prefill's token ids
        self.model = model
        self.plan = plan
        self.planner = planner
        self.capture_options = capture
        self.applied_plans: list[Plan] | None = None
        # what the reconstruction pass needs of the prefill, from layer 0 until the pass (then dropped)
        self._prefill: tuple[Tensor, Tensor, Tensor] | None = None  # ids, valid, positions: (b, n) each
        self._given_to_generate = False
        super().__init__(layers=[CompressedLayer(self, i) for i in range(dims.num_layers)])
        adapter.install_polykv_attention(model)

    @property
    def applied_plan(self) -> Plan | None:
        """The plan of every row (see the class docstring); None before an adaptive or capture-only compression."""
        plans = self.applied_plans
        if plans is None:
            return self.plan
        if all(p == plans[0] for p in plans[1:]):
            return plans[0]
        raise RuntimeError(
            f"this cache compressed a batch of {len(plans)} rows with different plans; read cache.applied_plans "
            "(one Plan per row)"
        )

    @property
    def prefill_length(self) -> int:
        """Tokens of the prefill this cache holds (the padded length of a batch); 0 while it is unused."""
        return self.layers[0].context_length

    def check_unused(self) -> None:
        """Raise ValueError if this cache already holds a prefill (a cache serves one ``generate`` call)."""
        if self.prefill_length:
            raise ValueError(
                f"this CompressedCache was already used for a prefill of {self.prefill_length} tokens; make a new "
                "one per generate call (polykv.make_cache)"
            )

    # transformers' generate marks every cache it is given with `_is_user_defined = True` before its prefill
    # (5.24: GenerationMixin._prepare_cache_for_generation): the one moment a second generate call is visible
    @property
    def _is_user_defined(self) -> bool:
        return self._given_to_generate

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        if value:
            self.check_unused()
        self._given_to_generate = bool(value)

    def reset(self) -> None:
        """Empty the cache (every layer, the applied plans): it can then take a new prefill."""
        super().reset()
        self.applied_plans = self._prefill = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.applied_plans is not None:  # beam search: row i now holds what row beam_idx[i] held
            self.applied_plans = [self.applied_plans[i] for i in beam_idx.tolist()]

    def on_prefill(self, layer: CompressedLayer, call: adapter.AttentionCall) -> None:
        layer.sliding_window = call.sliding_window
        b, n = call.key.shape[0], call.key.shape[2]
        valid = real_keys(call, n)  # (b, n)
        if layer.layer_idx == 0 and not bool(valid.all()):
            for r in range(b):
                real_length(valid[r], r)  # left padding only: refused before any policy runs
        positions = call.position_ids
        if positions is None:
            positions = torch.arange(n, device=call.key.device)[None, :]
        positions = positions.expand(b, n)
        options = self.capture_options
        if options.reconstruct and layer.layer_idx == 0:
            self._prefill = (prefill_ids(self.model, b, n), valid, positions)
        layerwise = isinstance(self.planner, LayerwisePlanner)
        # KVzip: the reconstruction pass runs after the last layer, over every layer's full cache: no layer evicts
        # before it, and a layerwise planner whose summary reads its attention summarises every layer after it
        postpone = layerwise and options.reconstruct and self.planner.summarize_reads_reconstruct_attn
        # H2O statistics cost O(n^2): a layerwise planner that does not read them gets them only where it needs them
        lazy = layerwise and options.accumulate and not self.planner.summarize_reads_accumulated_attn and not postpone
        layer.stats = compute_layer_stats(
            call.query,
            call.key,
            call.value,
            valid,
            positions,
            call.scaling,
            lambda pos: adapter.rope_cos_sin(self.model, pos, call.query.dtype, layer.layer_idx),
            dataclasses.replace(options, accumulate=False) if lazy else options,
            layer.layer_idx,
            call.sliding_window,
        )
        last = layer.layer_idx == len(self.layers) - 1
        if self.plan is not None and not options.reconstruct:
            layer.evict(self.plan.policies[layer.layer_idx], self._static_budgets(layer.layer_idx, b))
            if layer.layer_idx == 0:
                self.applied_plans = [self.plan] * b
            return
        if layerwise and not postpone:  # its statistics go now, not after the last layer
            accumulate = (lambda s: with_accumulated_attention(s, call.query, options.chunk)) if lazy else None
            layer.summarize(self.planner, accumulate, defer_reconstruct=options.reconstruct)
        if not last:
            return
        if options.reconstruct and (not layerwise or postpone or any(la.pending is not None for la in self.layers)):
            reconstruct_layers(self.model, self.layers, *self._prefill, options)
        self._prefill = None
        if self.plan is not None:  # static, held back for the reconstruction pass
            for la in self.layers:
                la.evict(self.plan.policies[la.layer_idx], self._static_budgets(la.layer_idx, b))
            self.applied_plans = [self.plan] * b
            return
        if postpone:
            for la in self.layers:
                la.summarize(self.planner, None)
        if self.planner is not None:
            self.compress()  # adaptive: every layer's statistics (or summary) exist once the last layer has attended

    def _static_budgets(self, layer: int, batch: int) -> int | list[tuple[int, ...]]:
        """What the fixed plan gives ``layer`` to evict (every row alike): its budget, or its head budgets."""
        if self.plan.head_budgets is None:
            return self.plan.budgets[layer]
        return [self.plan.head_budgets[layer]] * batch

    @property
    def layer_stats(self) -> list[LayerStats]:
        stats = [layer.stats for layer in self.layers]
        if any(s is None for s in stats):
            if any(layer.orders is not None for layer in self.layers):
                raise RuntimeError(
                    "this cache summarised each layer as its prefill ended (LayerwisePlanner) and kept no statistics; "
                    "a capture-only CompressedCache(model, capture=...) keeps them"
                )
            raise RuntimeError("statistics are only available between the prefill and the compression")
        return stats  # type: ignore[return-value]

    def compress(self, plan: Plan | Sequence[Plan] | None = None) -> list[Plan]:
        """Evict every layer now (adaptive mode) with ``plan`` (one ``Plan`` for every row, or one per row) or the
        planner's plan(s) for the captured stats; returns the plan of every row (``applied_plans``)."""
        if self.plan is not None:
            raise RuntimeError("this cache has a fixed plan: it compresses each layer during the prefill")
        if self.applied_plans is not None:
            raise RuntimeError("this cache is already compressed")
        layerwise = isinstance(self.planner, LayerwisePlanner)
        summarised = layerwise and all(layer.orders is not None for layer in self.layers)
        stats = None if summarised else self.layer_stats  # raises before the prefill
        if plan is None:
            if self.planner is None:
                raise ValueError("no plan given and this cache has no planner")
            plan = self.planner.plan([layer.summary for layer in self.layers]) if summarised else self.planner(stats)
        batch, g = self.layers[0].keys.shape[:2]
        plans = plans_per_row(plan, batch)
        for p in plans:
            p.check_dims(len(self.layers), g)
        for i, layer in enumerate(self.layers):  # before any eviction: every order the plan needs is there
            if layer.orders is not None:
                smallest = [min(p.layer_head_budgets(i, g)) for p in plans]  # a row is evicted if one head is
                layer.orders.check([p.policies[i] for p in plans], smallest, i)
        for i, layer in enumerate(self.layers):
            budgets = [p.budgets[i] if p.head_budgets is None else p.head_budgets[i] for p in plans]
            layer.evict([p.policies[i] for p in plans], budgets)
        self.applied_plans = plans
        return plans
