"""KVzip's context-reconstruction pass: which context positions the model reads to repeat the context.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv:2505.23416. After the
prefill of a context ``C`` (``n`` tokens), the model is teacher-forced on ``R = [repeat prompt] + C`` (``p + n``
tokens) at the positions after the context, every layer attending to its **full** context cache plus the causal
prefix of ``R`` itself. For layer ``l``, KV head ``g`` and context position ``j`` the score is

    reconstruct_attn[l][b, g, j] = max over the query heads of group g and over every position of R
                                   of the softmax attention on context position j,

the attention computed over all ``n + (prefix of R)`` visible keys. This pass is exact where KVzip's own code
approximates: it scores the whole context at once (the softmax sees every context key), chunked only to bound
memory: ``chunk`` tokens of ``R`` per forward, so a forward's attention is ``chunk x (n + p + n)``, never
``(p + 2n)^2``. The pass's own keys/values live in a temporary cache and are dropped with it; the context cache
is only read.

Left-padded batches: ``R`` of row ``r`` is the prompt followed by the row's padded context ids, its padding
masked: padding keys (context or repeated) are never visible, padding queries count in no maximum, and the real
tokens of ``R`` take the positions ``n_r, n_r + 1, ...`` after the row's own ``n_r`` real tokens, so each row
scores as if it ran alone (up to float rounding). Padding context positions score 0.

Computation. A float32 model takes the fused path: the pass's attention output from PyTorch's fused CPU flash
kernel (which also returns each query's log-sum-exp ``lse`` over its visible keys), and the scores from one product
``s = q Kc^T`` per KV group as ``exp(max over queries (s * scale + bias - lse))``, equal to the maximum of the
softmax since exp is monotone; no ``c x (n + t)`` probabilities are materialised. Without padding or a window, the
flash calls take no mask: the query heads of a KV group are stacked along the query axis for the context and the
pass's earlier keys (:func:`grouped_flash`, no per-head copy of K/V), and the forward's own block is causal; the
``- lse`` is an extra dimension of the score product (:func:`max_softmax`). Any other dtype (float64 models,
whose tests compare in float64) takes the explicit path: probabilities per KV group in float32 (float64 for a
float64 model), eager-style, which is also the fused path's test reference (``fused=False``). The last layer's
output is read by nothing, so each forward of the pass stops once that layer has its scores.

KVzip's and kvpress's own chunk-local scores (cheaper, not this module's definition) are
``CaptureOptions(reconstruct_scope="chunk")``: :mod:`polykv_learn.reconstruct_chunked`, built on this module's layer
(which also holds ``reconstruct_layers``, the capture's entry point for either scope).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from polykv_learn import adapter
from polykv_learn.capture import CaptureOptions

__all__ = ["REPEAT_PROMPT", "check_pass_inputs", "prefill_ids", "reconstruction_attention", "repeat_prompt_ids"]

#: the repeat instruction (KVzip's, ending in a newline as its prompt without a chat template)
REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"


@functools.lru_cache(maxsize=8)
def _default_prompt_ids(model_name: str) -> tuple[int, ...]:
    from polykv_learn.models import load_tokenizer

    return tuple(load_tokenizer(model_name)(REPEAT_PROMPT, add_special_tokens=False).input_ids)


def repeat_prompt_ids(model: PreTrainedModel, options: CaptureOptions) -> tuple[int, ...]:
    """The token ids of the repeat instruction: ``options.reconstruct_prompt``, or :data:`REPEAT_PROMPT` tokenised
    by the model's tokenizer (``models.load_tokenizer`` of the model's name, memoised)."""
    if options.reconstruct_prompt is not None:
        return options.reconstruct_prompt
    name = adapter.model_dims(model).name
    try:
        return _default_prompt_ids(name)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"kvzip's repeat prompt needs the tokenizer of {name!r}, which did not load ({err}); give its token ids "
            "as CaptureOptions(reconstruct_prompt=...)"
        ) from None


def expand_groups(x: Tensor, r: int) -> Tensor:
    """``(b, G, k, d) -> (b, G * r, k, d)``, a view: query head ``i`` reads KV head ``i // r`` (GQA, for the fused
    kernel, which takes one key per query head)."""
    b, g, k, d = x.shape
    return x[:, :, None].expand(b, g, r, k, d).flatten(1, 2)


def expanded_flash(
    q: Tensor, keys: Tensor, values: Tensor, scaling: float, bias: Tensor | None = None, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """PyTorch's fused CPU flash attention with K/V expanded to one head per query head (for a bias that varies
    with the query, or a causal block): q (b, H, c, d), keys and values (b, G, k, d), bias None or (b, 1, c, k) ->
    ``(out (b, H, c, d), lse (b, H, c))``."""
    r = q.shape[1] // keys.shape[1]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, expand_groups(keys, r), expand_groups(values, r), 0.0, causal, attn_mask=bias, scale=scaling
    )


def grouped_flash(q: Tensor, keys: Tensor, values: Tensor, scaling: float, bias: Tensor | None = None):
    """PyTorch's fused CPU flash attention of ``H`` query heads on ``G`` KV heads without copying K/V per query head:
    the ``H/G`` query heads of a group are stacked along the query axis, exact because every query of a group sees
    the same keys (``bias``: None or one per key, ``(b, 1, 1, k)``; never causal). q (b, H, c, d), keys and values
    (b, G, k, d) -> ``(out (b, H, c, d), lse (b, H, c))``."""
    b, h, c, d = q.shape
    g = keys.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(b, g, (h // g) * c, d), keys, values, 0.0, False, attn_mask=bias, scale=scaling
    )
    return out.reshape(b, h, c, d), lse.reshape(b, h, c)


def max_softmax(q: Tensor, keys: Tensor, lse: Tensor, scaling: float, bias: Tensor, per_query: bool) -> Tensor:
    """Per KV group ``g`` and key ``j``: ``max over the query heads of g and the queries of softmax(q k_j)``, from
    one product per group, as ``exp(max (q k_j * scaling + bias - lse))`` (exp is monotone), the ``- lse`` folded
    into the product as an extra dimension (``[q * scaling, -lse] . [k_j, 1]``), so no ``c x k`` pass of its own.

    q (b, H, c, d); keys (b, G, k, d); lse (b, H, c) over every key the softmax runs over (+inf: a query that
    counts in no maximum); bias (b, 1, c or 1, k), additive 0 / -inf, ``per_query``: it varies with the query (a
    sliding window) -> ``(b, G, k)``."""
    b, h, c, d = q.shape
    g, k = keys.shape[1], keys.shape[2]
    r = h // g
    qa = torch.cat([q * scaling, -lse[..., None].to(q.dtype)], dim=-1)  # (b, H, c, d + 1)
    ones = keys.new_ones(b, k, 1)
    best = keys.new_empty(b, g, k)
    for j in range(g):  # one KV group at a time: a (b, H/G * c, k) product at most
        ka = torch.cat([keys[:, j], ones], dim=-1)  # (b, k, d + 1)
        s = qa[:, j * r : (j + 1) * r].reshape(b, r * c, d + 1) @ ka.transpose(-1, -2)  # (b, H/G * c, k)
        if per_query:  # the bias depends on the query
            best[:, j] = s.view(b, r, c, k).add_(bias).amax(dim=(1, 2))
        else:  # one per key: it commutes with the maximum
            best[:, j] = s.amax(dim=1).add_(bias[:, 0, 0])
    return best.exp_()


class _LastLayerDone(Exception):
    """Raised by the last layer once it has its scores: the rest of that forward (its output projection, MLP and
    final norm) is read by nothing."""


class _Masks(NamedTuple):
    """One chunk's visibility: additive biases (0 or -inf) and whether each query sees any key of each part."""

    ctx_bias: Tensor  # (b, 1, 1, n), or (b, 1, c, n) on a sliding layer
    rep_bias: Tensor  # (b, 1, c, t) over the pass's own keys so far
    ctx_any: Tensor  # (b, 1) or (b, c): the query sees a context key
    rep_any: Tensor  # (b, c): the query sees a key of the pass
    sliding: bool
    rep_plain: bool  # no padding among the pass's keys so far and no window: they are plainly causal


class _RepeatLayer(DynamicLayer):
    """One layer of the reconstruction pass: reads the full context K/V ``(b, G, n, d)``, keeps the pass's own K/V
    in a buffer, and records the running maximum of the attention on each context position."""

    def __init__(
        self, layer_idx: int, keys: Tensor, values: Tensor, valid: Tensor, repeat_valid: Tensor, last: bool, fused: bool
    ):
        super().__init__()
        self.layer_idx, self.last, self.fused = layer_idx, last, fused
        self.context_keys, self.context_values = keys, values  # (b, G, n, d)
        self.context_valid = valid  # (b, n)
        self.repeat_valid = repeat_valid  # (b, p + n)
        b, g, n, d = keys.shape
        total = repeat_valid.shape[1]
        self.buffer_keys = keys.new_zeros(b, g, total, d)  # (b, G, p + n, d) the pass's own keys
        self.buffer_values = values.new_zeros(b, g, total, d)
        self.length = 0  # tokens of the pass stored so far
        dtype = torch.promote_types(keys.dtype, torch.float32)
        self.scores = torch.zeros(b, g, n, dtype=dtype, device=keys.device)  # (b, G, n) running maximum

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        c = key_states.shape[2]
        self.buffer_keys[:, :, self.length : self.length + c] = key_states
        self.buffer_values[:, :, self.length : self.length + c] = value_states
        self.length += c
        adapter.announce(self.layer_idx, self)
        return self.buffer_keys[:, :, : self.length], self.buffer_values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.context_keys.shape[2] + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def attend(self, call: adapter.AttentionCall) -> Tensor:
        q = call.query  # (b, H, c, d) post-RoPE queries of this chunk of the pass
        masks = self._masks(q.shape[2], call.sliding_window)
        if self.fused and q.dtype == torch.float32:
            out, lse_ctx, lse_rep = self._fused_output(call, masks)
            self._fused_scores(call, masks, lse_ctx, lse_rep)
        else:
            out = self._attend_explicit(call, masks)
        if self.last:  # nothing reads the last layer's output (only its scores): stop this chunk's forward here
            raise _LastLayerDone
        return out

    def _masks(self, c: int, window: int | None) -> _Masks:
        """The visibility of this chunk's ``c`` queries, as additive biases (0 or -inf) in the scores' dtype."""
        b, n = self.context_valid.shape
        t = self.length  # the pass's keys so far, this chunk's included
        start, dtype, device = t - c, self.scores.dtype, self.context_keys.device
        ctx_seen = self.context_valid[:, None, :]  # (b, 1, n)
        causal = torch.arange(t, device=device)[None, :] <= torch.arange(start, t, device=device)[:, None]  # (c, t)
        seen = causal[None] & self.repeat_valid[:, None, :t]  # (b, c, t)
        if window is not None:  # a sliding layer: a query sees only the keys less than W positions before it,
            # counted in each row's own positions (its padding sits inside the pass), so a row scores as alone
            ctx_pos = self.context_valid.cumsum(-1) - 1  # (b, n)
            rep_pos = self.context_valid.sum(-1, keepdim=True) + self.repeat_valid.cumsum(-1) - 1  # (b, p + n)
            q_pos = rep_pos[:, start:t, None]  # (b, c, 1)
            seen &= rep_pos[:, None, :t] > q_pos - window
            ctx_seen = ctx_seen & (ctx_pos[:, None, :] > q_pos - window)  # (b, c, n)
        ctx_bias = torch.zeros(ctx_seen.shape, dtype=dtype, device=device).masked_fill_(~ctx_seen, float("-inf"))
        rep_bias = torch.zeros(b, c, t, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))
        plain = window is None and bool(self.repeat_valid[:, :t].all())
        return _Masks(ctx_bias[:, None], rep_bias[:, None], ctx_seen.any(-1), seen.any(-1), window is not None, plain)

    def _attend_explicit(self, call: adapter.AttentionCall, masks: _Masks, score: bool = True) -> Tensor:
        """Explicit probabilities per KV group (float32, float64 for a float64 model): the reference. ``score``:
        also take this pass's scores from them (False: the output alone)."""
        q = call.query  # (b, H, c, d)
        b, h, c, d = q.shape
        g, n = self.context_keys.shape[1], self.context_keys.shape[2]
        r, t, dtype = h // g, self.length, self.scores.dtype
        q_real = self.repeat_valid[:, t - c : t].to(dtype)  # (b, c): padding queries count in no maximum
        out = torch.empty(b, c, h, d, dtype=q.dtype, device=q.device)
        for j in range(g):  # one KV group at a time: (b, H/G, c, n + t) probabilities at most
            qj = q[:, j * r : (j + 1) * r].to(dtype)  # (b, H/G, c, d)
            kc = self.context_keys[:, j, None].to(dtype)  # (b, 1, n, d)
            kr = call.key[:, j, None].to(dtype)  # (b, 1, t, d)
            s_ctx = (qj @ kc.transpose(-1, -2)).mul_(call.scaling).add_(masks.ctx_bias)  # (b, H/G, c, n)
            s_rep = (qj @ kr.transpose(-1, -2)).mul_(call.scaling).add_(masks.rep_bias)  # (b, H/G, c, t)
            probs = torch.softmax(torch.cat([s_ctx, s_rep], dim=-1), dim=-1)  # (b, H/G, c, n + t)
            if masks.sliding:  # a padding query may see nothing in its window: it attends nowhere
                probs.nan_to_num_(nan=0.0)
            del s_ctx, s_rep
            p_ctx = probs[..., :n]  # (b, H/G, c, n)
            if score:
                seen_max = (p_ctx * q_real[:, None, :, None]).amax(dim=(1, 2))  # (b, n)
                torch.maximum(self.scores[:, j], seen_max, out=self.scores[:, j])
            vc = self.context_values[:, j, None].to(dtype)  # (b, 1, n, d)
            vr = call.value[:, j, None].to(dtype)  # (b, 1, t, d)
            o = p_ctx @ vc + probs[..., n:] @ vr  # (b, H/G, c, d)
            out[:, :, j * r : (j + 1) * r] = o.transpose(1, 2).to(q.dtype)
        return out  # (b, c, H, d)

    def _fused_output(self, call: adapter.AttentionCall, masks: _Masks) -> tuple[Tensor, Tensor, Tensor]:
        """A float32 model: the output ``(b, c, H, d)`` from PyTorch's fused CPU flash kernel, once over the context
        keys and once over the pass's own, merged by their log-sum-exps, which it also returns: ``lse_ctx``,
        ``lse_rep`` ``(b, H, c)``, -inf for a query that sees no key of that part."""
        q = call.query  # (b, H, c, d)
        if masks.sliding:  # the bias depends on the query: one key per query head
            o_ctx, lse_ctx = expanded_flash(q, self.context_keys, self.context_values, call.scaling, masks.ctx_bias)
        else:
            bias = None if bool(self.context_valid.all()) else masks.ctx_bias  # (b, 1, 1, n)
            o_ctx, lse_ctx = grouped_flash(q, self.context_keys, self.context_values, call.scaling, bias)
        o_rep, lse_rep = self._fused_own(call, masks)
        # the kernel gives a query that sees no key an output of 0 and a log-sum-exp of 0: make it -inf
        lse_ctx = lse_ctx.masked_fill(~masks.ctx_any[:, None], float("-inf"))  # (b, H, c)
        out = merge_parts([(o_ctx, lse_ctx), (o_rep, lse_rep)])  # (b, H, c, d)
        return out.transpose(1, 2), lse_ctx, lse_rep

    @staticmethod
    def _fused_own(call: adapter.AttentionCall, masks: _Masks) -> tuple[Tensor, Tensor]:
        """The fused kernel over the pass's own keys: ``(out (b, H, c, d), lse (b, H, c))``, the lse -inf for a
        query that sees none of them (the kernel gives 0). Without padding or a window (``masks.rep_plain``) the
        keys before this forward's are visible to all of its queries and its own are causal: two calls without a
        mask (the causal one over the ``c x c`` block only), merged by their log-sum-exps."""
        q = call.query  # (b, H, c, d)
        c, t = q.shape[2], call.key.shape[2]
        if not masks.rep_plain:
            out, lse = expanded_flash(q, call.key, call.value, call.scaling, masks.rep_bias)
            return out, lse.masked_fill(~masks.rep_any[:, None], float("-inf"))
        # the causal c x c block of this forward's own keys: (b, H, c, d), (b, H, c)
        own = expanded_flash(q, call.key[:, :, t - c :], call.value[:, :, t - c :], call.scaling, causal=True)
        if t == c:
            return own
        before = grouped_flash(q, call.key[:, :, : t - c], call.value[:, :, : t - c], call.scaling)
        lse = torch.logaddexp(before[1], own[1])  # (b, H, c)
        return merge_parts([before, own], lse), lse

    def _fused_scores(self, call: adapter.AttentionCall, masks: _Masks, lse_ctx: Tensor, lse_rep: Tensor) -> None:
        """The scores exactly as ``max_q softmax = exp(max_q (s * scaling + bias - lse))`` (:func:`max_softmax`),
        no probabilities over ``n + t`` keys materialised."""
        t, c = self.length, call.query.shape[2]
        lse = torch.logaddexp(lse_ctx, lse_rep)  # (b, H, c) over all n + t visible keys
        # padding queries count in no maximum: +inf makes all of their scores exp(-inf) = 0
        lse = lse.masked_fill_(~self.repeat_valid[:, None, t - c : t], float("inf"))
        best = max_softmax(call.query, self.context_keys, lse, call.scaling, masks.ctx_bias, masks.sliding)
        torch.maximum(self.scores, best, out=self.scores)  # (b, G, n)


def merge_parts(parts: Sequence[tuple[Tensor, Tensor]], total: Tensor | None = None) -> Tensor:
    """Attention outputs over disjoint key sets merged into the one over their union: ``sum_i o_i exp(lse_i -
    lse)``, ``lse`` (``total``, or computed) the log-sum-exp over all of them; each ``(o (b, H, c, d), lse (b, H,
    c))``, lse -inf where the query sees no key of that part (a query that sees nothing at all gets 0)."""
    if total is None:
        total = parts[0][1]
        for _, lse in parts[1:]:
            total = torch.logaddexp(total, lse)
    out = torch.zeros_like(parts[0][0])
    for o, lse in parts:  # -inf - -inf for a query that sees nothing: weight 0
        out.add_(o * (lse - total).exp_().nan_to_num_(nan=0.0)[..., None])
    return out


class _RepeatCache(Cache):
    def __init__(self, layers: Sequence[_RepeatLayer]):
        super().__init__(layers=list(layers))


def check_pass_inputs(
    model: PreTrainedModel, context_ids: Tensor, kv: Sequence[tuple[Tensor, Tensor]], valid: Tensor, positions: Tensor
) -> tuple[int, int]:
    """``(b, n)`` of the prefill, or a one-line ValueError if its ids, mask, positions and K/V do not fit."""
    b, n = context_ids.shape
    if valid.shape != (b, n) or positions.shape != (b, n) or len(kv) != model.config.num_hidden_layers:
        raise ValueError(
            f"reconstruction_attention: context_ids {tuple(context_ids.shape)}, valid {tuple(valid.shape)}, "
            f"positions {tuple(positions.shape)} and {len(kv)} layers of K/V do not fit the model"
        )
    return b, n


@torch.no_grad()
def reconstruction_attention(
    model: PreTrainedModel,
    context_ids: Tensor,
    kv: Sequence[tuple[Tensor, Tensor]],
    valid: Tensor,
    positions: Tensor,
    prompt_ids: Sequence[int],
    chunk: int,
    *,
    fused: bool = True,
) -> list[Tensor]:
    """KVzip's scores of every layer (see the module docstring): ``(b, G, n)`` per layer, float32 (float64 for a
    float64 model).

    context_ids (b, n): the prefill's token ids (left padding allowed); kv: per layer the full context keys and
    values ``(b, G, n, d)`` (post-RoPE keys, as the cache holds them); valid (b, n): False for padding; positions
    (b, n): the prefill's position ids (the last one is each row's last real position); prompt_ids: the repeat
    instruction; chunk: tokens of the pass per forward; fused: False computes every layer's probabilities
    explicitly (the reference; a model that is not float32 always does)."""
    b, n = check_pass_inputs(model, context_ids, kv, valid, positions)
    if not prompt_ids:
        raise ValueError("the repeat prompt is empty: give at least one token id")
    device = context_ids.device
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)[None, :].expand(b, -1)  # (b, p)
    repeat_ids = torch.cat([prompt, context_ids], dim=1)  # (b, p + n)
    repeat_valid = torch.cat([torch.ones_like(prompt, dtype=torch.bool), valid.to(device)], dim=1)  # (b, p + n)
    # real tokens continue each row's positions after its last real one; padding keeps a neighbour's (unused)
    repeat_pos = positions[:, -1:].to(device) + repeat_valid.long().cumsum(dim=1)  # (b, p + n)
    last = len(kv) - 1
    valid = valid.to(device)
    layers = [_RepeatLayer(i, k, v, valid, repeat_valid, i == last, fused) for i, (k, v) in enumerate(kv)]
    cache = _RepeatCache(layers)
    with adapter.polykv_attention(model):
        for s in range(0, repeat_ids.shape[1], chunk):
            part = slice(s, s + chunk)
            try:
                adapter.forward_decoder(model, repeat_ids[:, part], cache, position_ids=repeat_pos[:, part])
            except _LastLayerDone:
                pass
    return [layer.scores for layer in layers]


def prefill_ids(model: PreTrainedModel, batch: int, n: int) -> Tensor:
    """The token ids ``(batch, n)`` of ``model``'s running prefill (needs :func:`adapter.track_input_ids`)."""
    ids = adapter.current_input_ids(model)
    if ids is None or tuple(ids.shape) != (batch, n):
        raise ValueError(
            "kvzip's reconstruction pass (CaptureOptions(reconstruct=True)) needs the prefill's token ids: call the "
            "model with input_ids, not inputs_embeds"
        )
    return ids
