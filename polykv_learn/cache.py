"""A real compressed KV cache: prefill with full attention, then physically evict each layer to its keep set.

``CompressedCache`` is a transformers ``Cache``: pass it to ``model(...)`` or ``model.generate(...)``. Each layer
holds only its kept context keys/values (layers may differ in length) plus what is generated afterwards. Positions
continue from the original context length: ``get_seq_length`` reports the *logical* length, so transformers
computes the same position ids as with a full cache, and the attention wrapper in :mod:`polykv_learn.adapter`
builds each layer's own mask (kept context keys are visible unless they are padding; new keys are causal).

Three ways to decide what to keep:
- ``plan=Plan(...)`` (static): a layer evicts as soon as its own prefill attention is done;
- ``planner=fn`` (adaptive): ``fn(stats_per_layer) -> Plan`` runs as soon as the last layer's prefill attention
  is done (every layer then evicts at once, before any new token);
- neither: capture only (full cache plus every layer's scoring statistics; what the simulator uses).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from polykv_learn import adapter
from polykv_learn.capture import CaptureOptions, compute_layer_stats
from polykv_learn.plan import Plan
from polykv_learn.policies import LayerStats, get_policy, keep_indices

Planner = Callable[[list[LayerStats]], Plan]


class CompressedLayer(DynamicLayer):
    """One layer: keys/values ``(batch, G, len, d)``; after eviction ``len = b_l + generated``."""

    def __init__(self, owner: CompressedCache, layer_idx: int):
        super().__init__()
        # a weak reference: a strong one would make every cache a reference cycle, which only the cyclic garbage
        # collector frees, so caches with their K/V (gigabytes over an evaluation) piled up between its rare runs
        self._owner = weakref.ref(owner)
        self.layer_idx = layer_idx
        self.logical_length = 0  # positions seen (context + generated), evicted ones included
        self.context_length = 0  # logical length of the prefill
        self.context_visible: Tensor | None = None  # (batch, G, b_l) bool: kept context key is not padding
        self.stats: LayerStats | None = None

    @property
    def owner(self) -> CompressedCache:
        owner = self._owner()
        if owner is None:
            raise RuntimeError("this cache layer outlived its CompressedCache")
        return owner

    # --- transformers' cache-layer protocol ---------------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        keys, values = super().update(key_states, value_states)
        self.logical_length += key_states.shape[-2]
        adapter.announce(self.layer_idx, self)
        return keys, values

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.logical_length = self.context_length = 0
        self.context_visible = self.stats = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.context_visible is not None:
            self.context_visible = self.context_visible.index_select(0, beam_idx.to(self.context_visible.device))

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
        if self.context_visible is None:  # nothing evicted: physical == logical, transformers' mask is right
            return call.run_base(call.query, call.key, call.value, None)
        visible_logical = call.visible(self.logical_length)  # (b, q, logical)
        b, h = call.query.shape[:2]
        g = self.keys.shape[1]
        new_visible = visible_logical[:, None, :, self.context_length :].expand(b, g, q_len, -1)
        ctx_visible = self.context_visible[:, :, None, :].expand(b, g, q_len, -1)
        visible = torch.cat([ctx_visible, new_visible], dim=-1).repeat_interleave(h // g, dim=1)  # (b, H, q, kv)
        return call.run_base(call.query, call.key, call.value, visible)

    def evict(self, policy: str, budget: int) -> None:
        """Keep ``budget`` context positions per KV head chosen by ``policy`` (all of them if budget >= n)."""
        if self.stats is None:
            raise RuntimeError(f"layer {self.layer_idx} has no prefill statistics to evict with")
        if self.logical_length != self.context_length:
            raise RuntimeError("eviction happens right after the prefill, before any new token")
        if budget < self.context_length:
            keep = keep_indices(get_policy(policy), self.stats, budget)  # (b, G, budget)
            index = keep[..., None].expand(-1, -1, -1, self.keys.shape[-1])
            self.keys = self.keys.gather(2, index)
            self.values = self.values.gather(2, index)
            self.context_visible = self.stats.valid[:, None, :].expand_as(self.stats.keys[..., 0]).gather(2, keep)
        self.stats = None


class CompressedCache(Cache):
    """A KV cache that evicts per layer after the prefill (see the module docstring)."""

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
            plan.check_num_layers(dims.num_layers)
        if capture is None:
            needs_h2o = plan is None or any(get_policy(p).needs_accumulated_attn for p in plan.policies)
            capture = CaptureOptions(accumulate=needs_h2o)
        self.model = model
        self.plan = plan
        self.planner = planner
        self.capture_options = capture
        self.applied_plan: Plan | None = plan
        super().__init__(layers=[CompressedLayer(self, i) for i in range(dims.num_layers)])
        adapter.install_polykv_attention(model)

    def on_prefill(self, layer: CompressedLayer, call: adapter.AttentionCall) -> None:
        n = call.key.shape[2]
        b = call.key.shape[0]
        valid = call.visible(n)[:, -1, :]  # (b, n): keys the last (real) query sees = non-padding
        positions = call.position_ids
        if positions is None:
            positions = torch.arange(n, device=call.key.device)[None, :]
        positions = positions.expand(b, n)
        layer.stats = compute_layer_stats(
            call.query,
            call.key,
            call.value,
            valid,
            positions,
            call.scaling,
            lambda pos: adapter.rope_cos_sin(self.model, pos, call.query.dtype),
            self.capture_options,
            layer.layer_idx,
        )
        if self.plan is not None:
            layer.evict(self.plan.policies[layer.layer_idx], self.plan.budgets[layer.layer_idx])
        elif self.planner is not None and layer.layer_idx == len(self.layers) - 1:
            self.compress()  # adaptive: every layer's statistics exist once the last layer has attended

    @property
    def layer_stats(self) -> list[LayerStats]:
        stats = [layer.stats for layer in self.layers]
        if any(s is None for s in stats):
            raise RuntimeError("statistics are only available between the prefill and the compression")
        return stats  # type: ignore[return-value]

    def compress(self, plan: Plan | None = None) -> Plan:
        """Evict every layer now (adaptive mode): with ``plan`` or the planner's plan for the captured stats."""
        if self.applied_plan is not None:
            raise RuntimeError("this cache is already compressed")
        if plan is None:
            if self.planner is None:
                raise ValueError("no plan given and this cache has no planner")
            plan = self.planner(self.layer_stats)
        plan.check_num_layers(len(self.layers))
        for layer, policy, budget in zip(self.layers, plan.policies, plan.budgets, strict=True):
            layer.evict(policy, budget)
        self.applied_plan = plan
        return plan


def cache_bytes(cache: Cache) -> int:
    """Bytes of key and value tensors actually held by ``cache`` (all layers)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total
