"""KVzip's chunk-local reconstruction scores: the definition of KVzip's and kvpress's own code, cheaper than the
exact whole-context pass of :mod:`polykv_learn.reconstruct` (``CaptureOptions(reconstruct_scope="chunk")``).

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv:2505.23416 (reference
code snu-mllab/KVzip ``attention/score.py``; NVIDIA kvpress ``KVzipPress``). The context ``C`` of a row
(``n`` real tokens) is split into chunks of ``S`` tokens (kvpress: 2048). Chunk ``i``'s repeat input is

    i = 0: ``FIRST_PROMPT`` + ``SUFFIX`` + chunk 0
    i > 0: ``LATER_PROMPT`` + the last ``PREV_TOKENS`` (8) tokens of chunk i-1 + ``SUFFIX`` + chunk i

(each piece tokenised alone, as kvpress does; ``SUFFIX`` is kvpress's ``"\\n"`` for a model without a chat
template), teacher-forced at the positions ``n, n + 1, ...`` after the context. Its forward attends to the **full**
context cache plus only its own repeat input (the previous chunks' repeat K/V are dropped: kvpress trims its cache
back to the context after each layer), so its hidden states see the whole context. Its scores, per layer ``l``,
KV head ``g`` and position ``j`` of chunk ``i``:

    score[l][g, j] = max over the query heads of g and the repeat input's queries of the softmax on key j,

the softmax over **only** the first ``min(sinks, i * S)`` context keys (kvpress ``n_sink = 4``; none for chunk 0,
whose own first keys they are), chunk ``i``'s context keys and the repeat input's own keys (causal). A position is
scored by its own chunk's forward alone. The first ``min(sinks, n)`` positions then score 1 (kvpress sets
``score_val[..., :n_sink] = 1``; its chunk 0 overwrites them when the context has no chat-template prefix,
``prefix_length = 0``, which this module does not copy). A sliding-window layer restricts both softmaxes to the
query's window as the model does.

Left-padded batches: each row is chunked on its own real tokens, so it scores as alone; forward ``i`` carries
chunk ``i`` of every row (left-padded, a row without one is all padding). Computation as in
:mod:`polykv_learn.reconstruct` (its ``_RepeatLayer``): float32 models take the fused flash path, whose scores use
the restricted log-sum-exp ``logaddexp(lse over the sinks and chunk keys, lse over the repeat input)``, the first
from a flash call over those keys alone (the output merges it with one over the other context keys); other
dtypes the explicit probabilities (``fused=False``: the reference). Each repeat input runs in forwards of at
most ``forward_chunk`` tokens (memory only: the scores do not depend on it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedModel

from polykv_learn import adapter
from polykv_learn import reconstruct as full_scope
from polykv_learn.capture import CaptureOptions, with_reconstruct_attention
from polykv_learn.reconstruct import (
    _LastLayerDone,
    _Masks,
    _RepeatCache,
    _RepeatLayer,
    check_pass_inputs,
    expanded_flash,
    grouped_flash,
    max_softmax,
    merge_parts,
    repeat_prompt_ids,
)

__all__ = [
    "FIRST_PROMPT",
    "LATER_PROMPT",
    "PREV_TOKENS",
    "SUFFIX",
    "ChunkPrompts",
    "RepeatChunk",
    "chunk_prompt_ids",
    "chunked_reconstruction_attention",
    "reconstruct_layers",
    "reconstruct_scope_entry",
    "repeat_chunks",
]

#: kvpress's instruction before the first chunk
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
#: kvpress's instruction before every later chunk, followed by the last PREV_TOKENS tokens of the chunk before
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
#: kvpress's suffix without a chat template (with one it is the template's generation suffix)
SUFFIX = "\n"
#: tokens of the previous chunk repeated in a later chunk's prompt (kvpress ``prev_postfix_size``)
PREV_TOKENS = 8


class ChunkPrompts(NamedTuple):
    """The token ids of the chunk scope's prompt pieces."""

    first: tuple[int, ...]
    later: tuple[int, ...]
    suffix: tuple[int, ...]


@functools.lru_cache(maxsize=8)
def _default_prompts(model_name: str) -> ChunkPrompts:
    from polykv_learn.models import load_tokenizer

    tok = load_tokenizer(model_name)
    ids = [tuple(tok(text, add_special_tokens=False).input_ids) for text in (FIRST_PROMPT, LATER_PROMPT, SUFFIX)]
    return ChunkPrompts(*ids)


def chunk_prompt_ids(model: PreTrainedModel) -> ChunkPrompts:
    """:data:`FIRST_PROMPT`, :data:`LATER_PROMPT` and :data:`SUFFIX` in the model's tokenizer (memoised)."""
    name = adapter.model_dims(model).name
    try:
        return _default_prompts(name)
    except (OSError, ValueError) as err:
        msg = f"kvzip's chunk-scope prompts need the tokenizer of {name!r}, which did not load ({err})"
        raise ValueError(msg) from None


def reconstruct_scope_entry(model: PreTrainedModel, options: CaptureOptions) -> dict[str, Any]:
    """What a chunk-scope prefill store's fingerprint records of the scores' definition: the scope, chunk size,
    sink count and the prompt pieces' token ids."""
    prompts = chunk_prompt_ids(model)
    return {
        "scope": options.reconstruct_scope,
        "context_chunk": options.reconstruct_context_chunk,
        "sinks": options.reconstruct_sinks,
        "prev_tokens": PREV_TOKENS,
        "prompts": [list(prompts.first), list(prompts.later), list(prompts.suffix)],
    }


class RepeatChunk(NamedTuple):
    """Forward ``i`` of the chunk scope: every row's repeat input for its chunk ``i``, the context keys it scores
    (``select``) and the other real context keys (``rest``), which its output attends to as well."""

    ids: Tensor  # (b, L) left-padded repeat inputs
    valid: Tensor  # (b, L) False for padding (a row without chunk i: all)
    select: Tensor  # (b, k + m) padded context indices: k sink slots, then m chunk slots
    select_valid: Tensor  # (b, k + m) whether each slot is a real key of the restricted softmax
    sinks: int  # k
    rest: Tensor  # (b, w) padded indices of the row's other real context positions
    rest_valid: Tensor  # (b, w) False for the slots past a row's own count


def repeat_chunks(
    context_ids: Tensor, valid: Tensor, prompts: ChunkPrompts, size: int, sinks: int
) -> list[RepeatChunk]:
    """The chunk scope's forwards for a left-padded prefill ``context_ids`` (b, n), ``valid`` (b, n): each row
    chunked on its own real tokens into ``size``-token chunks (see the module docstring)."""
    b, n = context_ids.shape
    real = [context_ids[r][valid[r]] for r in range(b)]  # (n_r,) each
    count = max((len(x) + size - 1) // size for x in real)
    out = []
    for i in range(count):
        seqs = []
        for x in real:
            if i * size >= len(x):
                seqs.append(x[:0])
                continue
            prompt = prompts.first if i == 0 else prompts.later
            prev = x[max((i - 1) * size, i * size - PREV_TOKENS) : i * size]  # empty for chunk 0
            head = torch.tensor([*prompt, *prev.tolist(), *prompts.suffix], dtype=x.dtype, device=x.device)
            seqs.append(torch.cat([head, x[i * size : (i + 1) * size]]))
        width = max(len(q) for q in seqs)
        ids = context_ids.new_zeros(b, width)
        rep_valid = torch.zeros(b, width, dtype=torch.bool, device=ids.device)
        for r, q in enumerate(seqs):
            ids[r, width - len(q) :], rep_valid[r, width - len(q) :] = q, True
        # slots: the k = min(sinks, i * size) sinks, then the longest row's chunk i (a full batch: all real)
        k = min(sinks, i * size)
        m = max(min(size, len(x) - i * size) for x in real)
        n_r = torch.tensor([len(x) for x in real], device=ids.device)[:, None]  # (b, 1)
        slot = torch.arange(k + m, device=ids.device)[None, :]  # (1, k + m)
        own = torch.where(slot < k, slot, i * size + slot - k)  # (b, k + m) the row's own token index
        ok = (own < n_r) & (n_r > i * size)  # a row without chunk i scores nothing
        select = (n - n_r + own).clamp(0, n - 1)  # (b, k + m) padded index
        others = valid.clone()
        for r in range(b):
            others[r, select[r][ok[r]]] = False
        w = int(others.sum(dim=1).max())
        rest = torch.zeros(b, w, dtype=torch.long, device=ids.device)
        rest_valid = torch.zeros(b, w, dtype=torch.bool, device=ids.device)
        for r in range(b):
            where = others[r].nonzero()[:, 0]
            rest[r, : len(where)], rest_valid[r, : len(where)] = where, True
        out.append(RepeatChunk(ids, rep_valid, select, ok, k, rest, rest_valid))
    return out


class _ChunkLayer(_RepeatLayer):
    """One layer of the chunk scope: :class:`~polykv_learn.reconstruct._RepeatLayer`'s output (full context plus
    the current repeat input), its own scores from the restricted softmax of the current chunk."""

    def start(self, chunk: RepeatChunk) -> None:
        """Drop the previous repeat input's K/V; the next forwards are chunk ``chunk``'s."""
        self.repeat_valid, self.length, self.chunk = chunk.valid, 0, chunk
        dtype, device = self.scores.dtype, self.scores.device

        def bias(ok: Tensor) -> Tensor:  # (b, w) -> (b, 1, 1, w): 0 for a real slot, -inf for padding
            return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))[:, None, None]

        self.select_bias, self.rest_bias = bias(chunk.select_valid), bias(chunk.rest_valid)
        self.select_all, self.rest_all = bool(chunk.select_valid.all()), bool(chunk.rest_valid.all())

    def _take(self, x: Tensor, index: Tensor) -> Tensor:
        """``x`` (b, G, n, d) at the padded context positions ``index`` (b, w) -> (b, G, w, d)."""
        b, g, _, d = x.shape
        return x.gather(2, index[:, None, :, None].expand(b, g, -1, d))

    def _bias(self, index: Tensor, slot_bias: Tensor, masks: _Masks) -> Tensor:
        """The additive bias over gathered keys: the slot's validity plus the model's own mask (padding, the
        window) -> (b, 1, 1 or c, w)."""
        bias = masks.ctx_bias  # (b, 1, 1 or c, n)
        return bias.gather(-1, index[:, None, None, :].expand(-1, -1, bias.shape[2], -1)).add_(slot_bias)

    def attend(self, call: adapter.AttentionCall) -> Tensor:
        self.select_keys = self._take(self.context_keys, self.chunk.select)  # (b, G, k + m, d), this forward only
        return super().attend(call)

    def _keep(self, j: int, best: Tensor) -> None:
        """``best`` (b, k + m) of KV head ``j``: its chunk slots into the running maximum (each position is scored
        by its own chunk's forwards only; an invalid slot adds 0)."""
        k = self.chunk.sinks
        vals = best[:, k:].masked_fill(~self.chunk.select_valid[:, k:], 0.0)
        self.scores[:, j].scatter_reduce_(-1, self.chunk.select[:, k:], vals, "amax")

    def _fused_output(self, call: adapter.AttentionCall, masks: _Masks) -> tuple[Tensor, Tensor, Tensor]:
        """The output as the parent's, but with the context split in two flash calls, the scored keys (sinks and
        chunk) and the rest, so the scored keys' log-sum-exp ``lse_sel`` comes with it; returns ``(out (b, c, H, d),
        lse_sel, lse_rep)``, each lse ``(b, H, c)`` and -inf where the query sees no key of the part."""
        q = call.query  # (b, H, c, d)
        b, h, c, d = q.shape
        plain = not masks.sliding and bool(self.context_valid.all())  # the model's own mask hides no context key
        chunk, outs, lses = self.chunk, [], []
        parts = ((chunk.select, self.select_bias, self.select_all), (chunk.rest, self.rest_bias, self.rest_all))
        for index, slot_bias, all_real in parts:
            if index.shape[1] == 0:  # no other key (the context is the chunk and its sinks)
                outs.append(q.new_zeros(b, h, c, d))
                lses.append(q.new_full((b, h, c), float("-inf")))
                continue
            bias = None if plain and all_real else self._bias(index, slot_bias, masks)  # (b, 1, 1 or c, w)
            keys, values = self._take(self.context_keys, index), self._take(self.context_values, index)
            if masks.sliding:  # the bias depends on the query: one key per query head
                o, lse = expanded_flash(q, keys, values, call.scaling, bias)
            else:
                o, lse = grouped_flash(q, keys, values, call.scaling, bias)
            if bias is not None:  # the kernel gives a query that sees no key a log-sum-exp of 0: make it -inf
                lse = lse.masked_fill(~torch.isfinite(bias).any(-1), float("-inf"))
            outs.append(o)
            lses.append(lse)
        o, lse = self._fused_own(call, masks)
        outs.append(o)
        lses.append(lse)
        out = merge_parts(list(zip(outs, lses, strict=True)))  # (b, H, c, d) over all n + t keys
        return out.transpose(1, 2), lses[0], lses[2]

    def _fused_scores(self, call: adapter.AttentionCall, masks: _Masks, lse_ctx: Tensor, lse_rep: Tensor) -> None:
        """``lse_ctx``: the scored keys' log-sum-exp (from :meth:`_fused_output`), so the restricted softmax's is
        ``logaddexp(lse_ctx, lse_rep)``, and the scores ``exp(max_q (s * scaling + bias - lse))``."""
        c, t = call.query.shape[2], self.length
        bias = self._bias(self.chunk.select, self.select_bias, masks)  # (b, 1, 1 or c, k + m)
        lse = torch.logaddexp(lse_ctx, lse_rep)  # (b, H, c)
        lse.masked_fill_(~self.repeat_valid[:, None, t - c : t], float("inf"))  # padding queries: no maximum
        best = max_softmax(call.query, self.select_keys, lse, call.scaling, bias, masks.sliding)  # (b, G, k + m)
        for j in range(best.shape[1]):
            self._keep(j, best[:, j])

    def _attend_explicit(self, call: adapter.AttentionCall, masks: _Masks, score: bool = True) -> Tensor:
        out = super()._attend_explicit(call, masks, score=False)
        q = call.query  # (b, H, c, d)
        c, g, t, dtype = q.shape[2], self.context_keys.shape[1], self.length, self.scores.dtype
        r = q.shape[1] // g
        bias = self._bias(self.chunk.select, self.select_bias, masks)
        q_real = self.repeat_valid[:, None, t - c : t, None].to(dtype)  # (b, 1, c, 1)
        width = self.select_keys.shape[2]
        for j in range(g):
            qj = q[:, j * r : (j + 1) * r].to(dtype)  # (b, H/G, c, d)
            s_sel = (qj @ self.select_keys[:, j, None].to(dtype).transpose(-1, -2)).mul_(call.scaling).add_(bias)
            s_rep = (qj @ call.key[:, j, None].to(dtype).transpose(-1, -2)).mul_(call.scaling).add_(masks.rep_bias)
            probs = torch.softmax(torch.cat([s_sel, s_rep], dim=-1), dim=-1).nan_to_num_(nan=0.0)  # (b, H/G, c, .)
            self._keep(j, (probs[..., :width] * q_real).amax(dim=(1, 2)))
        return out


@torch.no_grad()
def chunked_reconstruction_attention(
    model: PreTrainedModel,
    context_ids: Tensor,
    kv: Sequence[tuple[Tensor, Tensor]],
    valid: Tensor,
    positions: Tensor,
    prompts: ChunkPrompts,
    size: int,
    sinks: int,
    forward_chunk: int,
    *,
    fused: bool = True,
) -> list[Tensor]:
    """KVzip's chunk-local scores of every layer (see the module docstring): ``(b, G, n)`` per layer, float32
    (float64 for a float64 model). Arguments as :func:`polykv_learn.reconstruct.reconstruction_attention`, with
    the prompt pieces ``prompts``, the chunk size ``size``, the sink count ``sinks`` and at most ``forward_chunk``
    tokens per forward."""
    b, n = check_pass_inputs(model, context_ids, kv, valid, positions)
    if not prompts.first or not prompts.later:
        raise ValueError("the chunk scope's repeat prompts are empty: give at least one token id each")
    valid = valid.to(context_ids.device)
    chunks = repeat_chunks(context_ids, valid, prompts, size, sinks)
    longest = max((ch.ids.shape[1] for ch in chunks), default=1)  # no chunk at all: no real token, all scores 0
    last = len(kv) - 1
    layers = [_ChunkLayer(i, k, v, valid, valid.new_zeros(b, longest), i == last, fused) for i, (k, v) in enumerate(kv)]
    cache = _RepeatCache(layers)
    with adapter.polykv_attention(model):
        for chunk in chunks:
            for layer in layers:
                layer.start(chunk)
            # real tokens continue each row's positions after its last real one (kvpress: after the context)
            pos = positions[:, -1:].to(chunk.ids.device) + chunk.valid.long().cumsum(dim=1)  # (b, L)
            for s in range(0, chunk.ids.shape[1], forward_chunk):
                part = slice(s, s + forward_chunk)
                try:
                    adapter.forward_decoder(model, chunk.ids[:, part], cache, position_ids=pos[:, part])
                except _LastLayerDone:
                    pass
    # the first `sinks` real positions score 1 (kvpress's n_sink)
    sink = (valid.long().cumsum(dim=1) <= sinks) & valid  # (b, n)
    for layer in layers:
        layer.scores.masked_fill_(sink[:, None], 1.0)
    return [layer.scores for layer in layers]


def reconstruct_layers(
    model: PreTrainedModel, layers: Sequence, ids: Tensor, valid: Tensor, positions: Tensor, options: CaptureOptions
) -> None:
    """Run the reconstruction pass over the full prefill cache of ``layers`` (``cache.CompressedLayer``s, nothing
    evicted yet) and give each layer its attention: added to its statistics, and to the keep orders that waited
    for it (``finish_pending``). ``options.reconstruct_scope``: ``full`` (:mod:`polykv_learn.reconstruct`) or
    ``chunk`` (this module). It lives here, not in ``reconstruct``, because it dispatches to both."""
    kv = [(layer.keys, layer.values) for layer in layers]
    if options.reconstruct_scope == "chunk":
        attn = chunked_reconstruction_attention(
            model,
            ids,
            kv,
            valid,
            positions,
            chunk_prompt_ids(model),
            options.reconstruct_context_chunk,
            options.reconstruct_sinks,
            options.reconstruct_chunk,
        )
    else:
        prompt = repeat_prompt_ids(model, options)
        # through the module, so a test that wraps reconstruct.reconstruction_attention sees the call
        attn = full_scope.reconstruction_attention(model, ids, kv, valid, positions, prompt, options.reconstruct_chunk)
    for layer, a in zip(layers, attn, strict=True):
        if layer.stats is not None:
            layer.stats = with_reconstruct_attention(layer.stats, a)
        layer.finish_pending(a)
