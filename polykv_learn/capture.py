"""Scoring statistics of one layer, computed from its prefill queries/keys at cost O(w*n) (H2O: chunked O(n^2)).

Both the real compressed cache and the simulator call :func:`compute_layer_stats` on the same tensors, so their
keep sets are identical by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from polykv_learn import onednn
from polykv_learn.policies import LayerStats

#: the allowed ``CaptureOptions.reconstruct_scope`` values (``full``: the exact whole-context pass, the default)
RECONSTRUCT_SCOPES = ("full", "chunk")

#: the ``capture`` keys of an artifact that carry the reconstruction scope (absent: ``full``)
SCOPE_KEYS = ("reconstruct_scope", "reconstruct_context_chunk", "reconstruct_sinks")

#: maps position ids (batch, len) to RoPE (cos, sin), each (batch, len, d)
RopeFn = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class CaptureOptions:
    """What a prefill records for scoring.

    window: observation window ``w`` (last context positions whose queries are kept; SnapKV/TOVA/features).
    future: number ``T`` of positions after the context used by ``expected_attention``.
    accumulate: also compute attention summed over all prefill queries (H2O); costs O(n^2 d) in chunks.
    chunk: query chunk size for the accumulated attention (never n x n at once).
    reconstruct: after the prefill, run KVzip's context-reconstruction pass (:mod:`polykv_learn.reconstruct`:
        the repeat prompt then the context again, through the whole model) and record its attention; costs about
        two prefills more.
    reconstruct_chunk: tokens of the reconstruction pass per forward (never its whole ``(p + n)^2`` at once).
    reconstruct_prompt: token ids of the repeat instruction; None: ``reconstruct.REPEAT_PROMPT`` tokenised by the
        model's tokenizer (the ``full`` scope only).
    reconstruct_scope: ``full`` (the default: every query of the pass attends to the whole context and the whole
        pass so far, its softmax over all of them) or ``chunk`` (KVzip's and kvpress's own definition,
        :mod:`polykv_learn.reconstruct_chunked`: the context repeated in chunks, each scored by its own repeat
        input's softmax restricted to the sinks, the chunk and that input; cheaper).
    reconstruct_context_chunk: context tokens per chunk of the ``chunk`` scope (kvpress: 2048).
    reconstruct_sinks: first context keys every chunk's restricted softmax also sees (kvpress ``n_sink``: 4).
    """

    window: int = 32
    future: int = 32
    accumulate: bool = False
    chunk: int = 256
    reconstruct: bool = False
    reconstruct_chunk: int = 512
    reconstruct_prompt: tuple[int, ...] | None = None
    reconstruct_scope: str = "full"
    reconstruct_context_chunk: int = 2048
    reconstruct_sinks: int = 4

    def __post_init__(self) -> None:
        for name in ("window", "future", "chunk", "reconstruct_chunk", "reconstruct_context_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"CaptureOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.reconstruct_sinks < 0:
            raise ValueError(f"CaptureOptions.reconstruct_sinks must be >= 0, got {self.reconstruct_sinks}")
        if self.reconstruct_scope not in RECONSTRUCT_SCOPES:
            allowed = ", ".join(repr(s) for s in RECONSTRUCT_SCOPES)
            scope = self.reconstruct_scope
            raise ValueError(f"CaptureOptions.reconstruct_scope must be one of {allowed}, got {scope!r}")
        prompt = self.reconstruct_prompt
        if prompt is not None:
            if isinstance(prompt, str | bytes) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt
            ):
                raise ValueError(
                    f"CaptureOptions.reconstruct_prompt must be token ids (integers >= 0) or None, got {prompt!r}"
                )
            if not prompt:
                raise ValueError("CaptureOptions.reconstruct_prompt is empty: give at least one token id, or None")
            object.__setattr__(self, "reconstruct_prompt", tuple(prompt))
            if self.reconstruct_scope != "full":
                raise ValueError(
                    "CaptureOptions.reconstruct_prompt is for reconstruct_scope 'full' only (the 'chunk' scope builds "
                    "kvpress's repeat prompts with the model's tokenizer)"
                )


def scope_fields(options: CaptureOptions) -> dict[str, Any]:
    """The reconstruction scope as an artifact's ``capture`` keys: none for ``full`` (so every artifact made before
    the option reads the same), else ``reconstruct_scope``, ``reconstruct_context_chunk``, ``reconstruct_sinks``."""
    if options.reconstruct_scope == "full":
        return {}
    return {name: getattr(options, name) for name in SCOPE_KEYS}


def scope_options(capture: dict[str, Any]) -> dict[str, Any]:
    """:class:`CaptureOptions` keyword arguments from an artifact's ``capture`` object (absent keys: the defaults,
    scope ``full``)."""
    return {name: capture[name] for name in SCOPE_KEYS if name in capture}


def _masked_softmax(scores: Tensor, visible: Tensor) -> Tensor:
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a query that sees nothing (padding) attends nowhere


def window_attention(
    queries: Tensor, keys: Tensor, valid: Tensor, scaling: float, sliding_window: int | None = None
) -> Tensor:
    """Softmax attention of the last ``w`` queries over the context: queries (b, H, w, d), keys (b, G, n, d),
    valid (b, n) -> (b, H, w, n), causal within the context, padding masked, float32; ``sliding_window`` W: each
    query sees only the keys less than W positions before it (the model's own sliding mask). In place where it can
    be: one temporary of the output's size."""
    b, h, w, d = queries.shape
    g, n = keys.shape[1], keys.shape[2]
    q = queries.float().reshape(b, g, h // g, w, d)
    scores = torch.einsum("bgrwd,bgnd->bgrwn", q, keys.float()).mul_(scaling)  # (b, G, H/G, w, n)
    q_index = torch.arange(n - w, n, device=keys.device)
    causal = torch.arange(n, device=keys.device)[None, :] <= q_index[:, None]  # (w, n)
    if sliding_window is not None:
        causal &= torch.arange(n, device=keys.device)[None, :] > q_index[:, None] - sliding_window
    visible = causal[None, None, None] & valid[:, None, None, None, :]
    probs = torch.softmax(scores.masked_fill_(~visible, float("-inf")), dim=-1)
    del scores
    return probs.nan_to_num_(nan=0.0).reshape(b, h, w, n)  # a query that sees nothing (padding) attends nowhere


def accumulated_attention(
    queries: Tensor, keys: Tensor, valid: Tensor, scaling: float, chunk: int, sliding_window: int | None = None
) -> Tensor:
    """H2O statistics: attention of every valid prefill query summed per key, computed in query chunks.
    queries (b, H, n, d), keys (b, G, n, d), valid (b, n) -> (b, H, n) float32; ``sliding_window`` W: each query
    sees only the keys less than W positions before it.

    Per sequence and KV head, a chunk's scores are one matrix product of its H/G query heads' queries with the
    keys (:func:`polykv_learn.onednn.linear`: oneDNN on CPU, faster than the batched ``matmul``; see
    ``benchmarks/linear_backend.py``),
    and only the chunk's diagonal block needs the causal mask (earlier keys are all visible). The chunks run from
    the last (the widest) to the first, so each later chunk's temporaries fit in the memory the previous one freed
    (growing ones fragment the heap); their per-key sums are then added chunk by chunk from the first, the order
    that defines the result."""
    b, h, n, d = queries.shape
    g = keys.shape[1]
    r = h // g
    k = keys.float()  # (b, G, n, d)
    q_all = queries.float().reshape(b, g, r, n, d)
    total = torch.zeros(b, g, r, n, dtype=torch.float32, device=keys.device)
    key_bias = torch.zeros(b, n, device=keys.device).masked_fill(~valid, float("-inf"))  # (b, n)
    all_valid = bool(valid.all())  # no padding (e.g. one sequence): the causal mask alone, filled in place
    starts = range(0, n, chunk)
    sums = torch.empty(len(starts), r, n, device=keys.device)  # (chunks, H/G, n): one chunk's probs summed over queries
    for i in range(b):
        for j in range(g):
            for ci in reversed(range(len(starts))):
                start = starts[ci]
                stop = min(start + chunk, n)
                c = stop - start
                # causal: queries start..stop-1 see keys 0..stop-1 only; later keys are never computed (half the work)
                block = torch.ones(c, c, dtype=torch.bool, device=keys.device).triu_(1)  # (c, c) future keys
                if sliding_window is not None:  # keys W or more positions before a query: out of its window
                    q_idx = torch.arange(start, stop, device=keys.device)[:, None]
                    far = torch.arange(stop, device=keys.device)[None, :] <= q_idx - sliding_window  # (c, stop)
                q = q_all[i, j, :, start:stop].reshape(r * c, d)
                scores = onednn.linear(q, k[i, j, :stop]).mul_(scaling).view(r, c, stop)  # (H/G, c, stop)
                if all_valid:
                    scores[:, :, start:].masked_fill_(block, float("-inf"))
                    if sliding_window is not None:
                        scores.masked_fill_(far, float("-inf"))
                    probs = torch.softmax(scores, dim=-1)
                else:
                    q_valid = valid[i, start:stop]  # (c,)
                    causal = torch.zeros(c, stop, device=keys.device)
                    causal[:, start:].masked_fill_(block, float("-inf"))  # (c, stop)
                    if sliding_window is not None:
                        causal.masked_fill_(far, float("-inf"))
                    # a padding query sees nothing; give it a finite row (it is weighted by 0 below), not NaNs
                    bias = torch.where(q_valid[:, None], causal + key_bias[i, None, :stop], torch.zeros(()))
                    probs = torch.softmax(scores.add_(bias), dim=-1).mul_(q_valid[None, :, None])
                del scores
                sums[ci, :, :stop] = probs.sum(dim=-2)
                del probs
            for ci, start in enumerate(starts):
                stop = min(start + chunk, n)
                total[i, j, :, :stop] += sums[ci, :, :stop]
    return total.reshape(b, h, n)


def compute_layer_stats(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    positions: Tensor,
    scaling: float,
    rope: RopeFn,
    options: CaptureOptions,
    layer_idx: int,
    sliding_window: int | None = None,
) -> LayerStats:
    """queries (b, H, n, d) post-RoPE, keys/values (b, G, n, d), valid/positions (b, n) -> LayerStats.
    ``sliding_window``: the layer's window W (a sliding-window layer), None for full attention: the attention
    statistics then follow the model's sliding mask."""
    n = keys.shape[2]
    w = min(options.window, n)  # a context shorter than the window uses all of it as the window
    window_q = queries[:, :, n - w :].clone()  # a copy: a view would keep every prefill query alive
    window_pos = positions[:, n - w :]
    future_pos = positions[:, -1:] + torch.arange(1, options.future + 1, device=positions.device)[None, :]
    window_cos, window_sin = rope(window_pos)
    future_cos, future_sin = rope(future_pos)
    return LayerStats(
        keys=keys,
        values=values,
        window_queries=window_q.detach(),  # (b, H, w, d)
        window_attn=window_attention(window_q, keys, valid, scaling, sliding_window),
        valid=valid,
        positions=positions,
        scaling=scaling,
        window_cos=window_cos,
        window_sin=window_sin,
        future_cos=future_cos,
        future_sin=future_sin,
        accumulated_attn=accumulated_attention(queries, keys, valid, scaling, options.chunk, sliding_window)
        if options.accumulate
        else None,
        layer_idx=layer_idx,
        sliding_window=sliding_window,
    )


def with_reconstruct_attention(stats: LayerStats, attn: Tensor) -> LayerStats:
    """``stats`` with the reconstruction pass's attention ``attn`` (b, G, n) (:mod:`polykv_learn.reconstruct`).
    A new ``LayerStats`` (nothing derived from the old one is reused)."""
    if attn.shape != stats.keys.shape[:3]:
        raise ValueError(f"reconstruct_attn must have shape {tuple(stats.keys.shape[:3])}, got {tuple(attn.shape)}")
    return replace(stats, reconstruct_attn=attn)


def with_accumulated_attention(stats: LayerStats, queries: Tensor, chunk: int) -> LayerStats:
    """``stats`` (captured without it) with the accumulated attention of the same prefill: what
    :func:`compute_layer_stats` computes with ``accumulate`` set, for the same post-RoPE ``queries`` (b, H, n, d).
    A new ``LayerStats`` (nothing derived from the old one is reused)."""
    # (b, H, n)
    acc = accumulated_attention(queries, stats.keys, stats.valid, stats.scaling, chunk, stats.sliding_window)
    return replace(stats, accumulated_attn=acc)
