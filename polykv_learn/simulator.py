"""The masked-attention simulator: evaluate many eviction plans for one context with one prefill.

Post-prefill eviction never changes the context's hidden states, only what later tokens can attend to. So the
probe logits under a compressed cache equal a forward pass of the probe in which, at every layer, probe queries
attend to the context keys of that layer's keep set (per KV head) plus the probe keys causally, at the original
positions (design §4). We prefill the context once (capturing per-layer K/V and scoring statistics), then run all
plans as one batch of probes sharing the context K/V; the keep sets enter as an additive key bias
``(plans, G, n)`` (0 / -inf for hard plans, ``log(w + eps)`` for the soft keep weights of training).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache
from polykv_learn.capture import CaptureOptions
from polykv_learn.kernels import context_attention
from polykv_learn.kernels.reference import causal_attention_with_lse, context_attention_reference, merge_attention
from polykv_learn.plan import Plan
from polykv_learn.policies import LayerStats, get_policy, keep_ranks
from polykv_learn.prefix_reuse import prefix_groups, representative_biases, shared_prefix_layers


@dataclass
class ContextCapture:
    """One prefilled context: per-layer K/V ``(G, n, d)``, scoring statistics, and the last position's logits.

    ``windows``: each layer's sliding window ``W`` (None: full attention), for a capture without statistics (a
    stored prefill keeps ranks only); with statistics, each layer's own ``sliding_window`` is used."""

    keys: list[Tensor]
    values: list[Tensor]
    stats: list[LayerStats]
    last_logits: Tensor  # (vocab,) logits at the last context position (they predict the first probe token)
    _ranks: dict[tuple[int, str], Tensor]
    windows: list[int | None] = field(default_factory=list)

    @property
    def context_length(self) -> int:
        return self.keys[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def ranks(self, layer: int, policy: str) -> Tensor:
        """Rank of each context position under ``policy`` at ``layer``: (G, n) long, 0 = kept first (cached)."""
        key = (layer, policy)
        if key not in self._ranks:
            self._ranks[key] = keep_ranks(get_policy(policy), self.stats[layer])[0]
        return self._ranks[key]

    def keep_mask(self, layer: int, policy: str, budget: int | Sequence[int]) -> Tensor:
        """(G, n) bool: the keep set of ``policy`` with ``budget`` at ``layer`` (all if budget >= n); ``budget``:
        one for every KV head, or one per KV head (head-wise budgets: a head keeps its first ``b_h`` positions). A
        sliding layer keeps only positions in its window (its first ``W - 1`` ranks), as the real cache does."""
        ranks = self.ranks(layer, policy)  # (G, n)
        if isinstance(budget, Sequence):
            keep = ranks < torch.tensor(budget, device=ranks.device)[:, None]
        else:
            keep = ranks < budget
        window = self.window(layer)
        if window is not None:  # the last W - 1 positions (LayerStats.in_window)
            keep[:, : max(self.context_length + 1 - window, 0)] = False
        return keep

    def window(self, layer: int) -> int | None:
        """The sliding window ``W`` of ``layer`` (None: full attention): from its statistics, else from
        ``windows`` (a stored prefill). A capture with neither is refused in one line."""
        if layer < len(self.stats):
            return self.stats[layer].sliding_window
        if layer < len(self.windows):
            return self.windows[layer]
        raise ValueError(
            f"layer {layer} has neither statistics nor a window: a capture without statistics needs windows "
            f"(one per layer, None for full attention; {self.num_layers} layers)"
        )


@dataclass
class SimulationResult:
    logits: Tensor  # (num_plans, m, vocab) probe logits under each plan
    kl: Tensor  # (num_plans,) mean over probe positions of KL(full || plan)
    full_logits: Tensor  # (m, vocab) probe logits with the full cache


class _ProbeLayer(DynamicLayer):
    """A probe-pass cache layer: holds the shared context K/V and the plans' key bias, stores nothing new."""

    def __init__(self, layer_idx: int, keys: Tensor, values: Tensor, bias: Tensor):
        super().__init__()
        self.layer_idx = layer_idx
        self.context_keys, self.context_values, self.bias = keys, values, bias  # (G, n, d) x2, (P, G, n)
        self.length = keys.shape[1]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        adapter.announce(self.layer_idx, self)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def attend(self, call: adapter.AttentionCall) -> Tensor:
        q = call.query  # (P, H, m, d)
        window = call.sliding_window
        if window is None:
            out_c, lse_c = context_attention(q, self.context_keys, self.context_values, self.bias, call.scaling)
        else:  # a sliding layer: probe query i sees context key j only while j > n + i - W (torch reference)
            m, n = q.shape[2], self.length
            far = torch.arange(n, device=q.device)[None, :] <= torch.arange(n, n + m, device=q.device)[:, None] - window
            band = torch.zeros(m, n, dtype=self.bias.dtype, device=q.device).masked_fill(far, float("-inf"))
            bias = self.bias[:, :, None, :] + band  # (P, G, m, n)
            out_c, lse_c = context_attention_reference(q, self.context_keys, self.context_values, bias, call.scaling)
        out_p, lse_p = causal_attention_with_lse(q, call.key, call.value, call.scaling, window)
        return merge_attention(out_c, lse_c, out_p, lse_p).transpose(1, 2)  # (P, m, H, d)


class _ProbeCache(Cache):
    def __init__(self, capture: ContextCapture, biases: Sequence[Tensor]):
        tensors = zip(capture.keys, capture.values, biases, strict=True)
        layers = [_ProbeLayer(i, k, v, b) for i, (k, v, b) in enumerate(tensors)]
        super().__init__(layers=layers)


class Simulator:
    """Evaluate eviction plans on a model by one context prefill and one batched probe pass.

    ``capture`` holds the options of the statistics recorded at prefill (window, future positions); H2O's
    accumulated attention and KVzip's reconstruction attention are recorded when a plan needs them (or with
    ``accumulate=True`` / ``reconstruct=True``).
    """

    def __init__(self, model: PreTrainedModel, capture: CaptureOptions | None = None):
        self.model = model
        self.dims = adapter.model_dims(model)
        self.capture_options = capture or CaptureOptions()

    # --- prefill --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(
        self, context_ids: Tensor, accumulate: bool | None = None, reconstruct: bool | None = None
    ) -> ContextCapture:
        """Prefill ``context_ids`` ((n,) or (1, n)) once and keep what every plan needs; ``accumulate`` /
        ``reconstruct`` (None: the simulator's capture options) record H2O's / KVzip's statistics."""
        context_ids = _as_single_sequence(context_ids, "context_ids")
        options = self.capture_options
        if accumulate is not None:
            options = replace(options, accumulate=accumulate)
        if reconstruct is not None:
            options = replace(options, reconstruct=reconstruct)
        cache = CompressedCache(self.model, capture=options)
        out = adapter.forward(self.model, context_ids, cache, logits_to_keep=1)
        return ContextCapture(
            keys=[layer.keys[0] for layer in cache.layers],
            values=[layer.values[0] for layer in cache.layers],
            stats=cache.layer_stats,
            last_logits=out.logits[0, -1].float(),
            _ranks={},
        )

    # --- plans -> key biases -----------------------------------------------------------------------------------
    def hard_biases(self, capture: ContextCapture, plans: Sequence[Plan]) -> list[Tensor]:
        """Per layer, the (P, G, n) bias of each plan's keep set: 0 kept, -inf evicted (head budgets per KV head)."""
        biases = []
        for layer in range(capture.num_layers):
            masks = torch.stack([capture.keep_mask(layer, p.policies[layer], _layer_budget(p, layer)) for p in plans])
            zero = torch.zeros((), dtype=capture.keys[layer].dtype, device=masks.device)
            biases.append(torch.where(masks, zero, torch.full_like(zero, float("-inf"))))
        return biases

    # --- probe pass --------------------------------------------------------------------------------------------
    def probe_logits(
        self, capture: ContextCapture, probe_ids: Tensor, biases: Sequence[Tensor], reuse: bool | None = None
    ) -> Tensor:
        """Logits ``(P, m, vocab)`` of the probe under the per-layer key biases ``(P, G, n)`` (differentiable).

        ``reuse`` (None: when no bias needs gradients): plans whose biases agree on layers ``0..l`` share layer
        ``l``'s computation (:mod:`polykv_learn.prefix_reuse`); the logits are the same as without it."""
        probe_ids = _as_single_sequence(probe_ids, "probe_ids")
        if len(biases) != capture.num_layers:
            raise ValueError(f"need one bias per layer ({capture.num_layers}), got {len(biases)}")
        num_plans, m, n = biases[0].shape[0], probe_ids.shape[1], capture.context_length
        if reuse is None:
            reuse = not (torch.is_grad_enabled() and any(b.requires_grad for b in biases))
        groups = prefix_groups(biases) if reuse and num_plans > 1 else []
        if groups and not any(g.shared for g in groups):
            groups = []
        positions = torch.arange(n, n + m, device=probe_ids.device)[None, :].expand(num_plans, m)
        if groups:  # a shared layer's cache holds its groups' representatives' biases
            biases = representative_biases(biases, groups)
        cache = _ProbeCache(capture, biases)
        sharing = shared_prefix_layers(adapter.decoder_layers(self.model), groups) if groups else nullcontext()
        with adapter.polykv_attention(self.model), sharing:
            out = adapter.forward(self.model, probe_ids.expand(num_plans, m), cache, position_ids=positions)
        return out.logits.float()  # row j predicts probe token j+1 (token 0 comes from the context alone)

    def evaluate(self, context_ids: Tensor, probe_ids: Tensor, plans: Sequence[Plan]) -> SimulationResult:
        """Probe logits and KL to the full cache for every plan, from one prefill and one batched probe pass."""
        if not plans:
            raise ValueError("evaluate needs at least one plan")
        if context_ids.ndim == 2 and probe_ids.ndim == 2 and context_ids.shape[0] != probe_ids.shape[0]:
            raise ValueError(
                f"batch size mismatch: context has {context_ids.shape[0]} rows, probe {probe_ids.shape[0]}"
            )
        context_ids = _as_single_sequence(context_ids, "context_ids")
        probe_ids = _as_single_sequence(probe_ids, "probe_ids")
        for plan in plans:
            plan.check_dims(self.dims.num_layers, self.dims.num_kv_heads)
        used = [get_policy(p) for p in {p for plan in plans for p in plan.policies}]
        accumulate = any(p.needs_accumulated_attn for p in used) or self.capture_options.accumulate
        reconstruct = any(p.needs_reconstruct_attn for p in used) or self.capture_options.reconstruct
        capture = self.capture(context_ids, accumulate=accumulate, reconstruct=reconstruct)
        full_plan = Plan.uniform(plans[0].policies[0], capture.context_length, self.dims.num_layers)
        with torch.no_grad():
            logits = self.probe_logits(capture, probe_ids, self.hard_biases(capture, [*plans, full_plan]))
        full = logits[-1]
        return SimulationResult(logits=logits[:-1], kl=kl_to_full(full, logits[:-1]), full_logits=full)


def _layer_budget(plan: Plan, layer: int) -> int | tuple[int, ...]:
    """What ``plan`` keeps per KV head at ``layer``: its budget, or its head budgets."""
    return plan.budgets[layer] if plan.head_budgets is None else plan.head_budgets[layer]


def kl_to_full(full_logits: Tensor, logits: Tensor) -> Tensor:
    """Mean over positions of KL(softmax(full) || softmax(logits)): full (m, V), logits (P, m, V) -> (P,)."""
    log_p = F.log_softmax(full_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)


def _as_single_sequence(ids: Tensor, name: str) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"{name} must be a LongTensor of token ids, got {type(ids).__name__}")
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(
            f"{name} must have shape (n,) or (1, n): the simulator takes one sequence; got {tuple(ids.shape)}"
        )
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty: it needs at least one token")
    return ids.long()
