"""Random, internally consistent ``LayerStats`` for policy tests (float64, real RoPE, real causal softmax)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polykv_learn.policies.base import LayerStats


def rope_cos_sin(positions: Tensor, dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Llama RoPE cos/sin ``(..., dim)`` for integer ``positions`` ``(...)`` (halves duplicated)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    freqs = positions.to(torch.float64)[..., None] * inv_freq  # (..., dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., dim)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def random_layer_stats(
    batch: int = 2,
    kv_heads: int = 3,
    heads: int = 6,
    n: int = 50,
    window: int = 8,
    dim: int = 16,
    pad: int = 5,
    seed: int = 0,
    future: int = 16,
    layer_idx: int = 0,
) -> LayerStats:
    """Stats of one layer. Sequence 0 is unpadded; every later sequence is left-padded by ``pad`` positions
    (padding position ids are 1, as Hugging Face fills them), and its real tokens start at position 0."""
    assert heads % kv_heads == 0 and dim % 2 == 0
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    group = heads // kv_heads

    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1:, :pad] = False
    positions = (valid.long().cumsum(dim=-1) - 1).masked_fill(~valid, 1)  # (batch, n)

    cos, sin = rope_cos_sin(positions, dim)  # (batch, n, dim)
    queries = apply_rope(torch.randn(batch, heads, n, dim, generator=gen, dtype=f64), cos[:, None], sin[:, None])
    keys = apply_rope(torch.randn(batch, kv_heads, n, dim, generator=gen, dtype=f64), cos[:, None], sin[:, None])
    values = torch.randn(batch, kv_heads, n, dim, generator=gen, dtype=f64)
    # Give the query distribution a non-zero mean so the expected-attention statistics are not trivial.
    queries = queries + torch.randn(1, heads, 1, dim, generator=gen, dtype=f64)

    scaling = 1.0 / math.sqrt(dim)
    keys_h = keys.repeat_interleave(group, dim=1)  # (batch, H, n, d)
    logits = queries @ keys_h.transpose(-1, -2) * scaling  # (batch, H, n, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()  # (n queries, n keys)
    allowed = causal[None, None] & valid[:, None, None, :]  # (batch, 1, n, n)
    attn = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    attn = torch.nan_to_num(attn, nan=0.0)  # padding query rows see no key at all
    attn = attn * valid[:, None, :, None]  # padding queries contribute nothing

    last = positions[:, -1]  # (batch,)
    future_pos = last[:, None] + 1 + torch.arange(future)  # (batch, T)
    future_cos, future_sin = rope_cos_sin(future_pos, dim)

    return LayerStats(
        keys=keys,
        values=values,
        window_queries=queries[:, :, n - window :].clone(),
        window_attn=attn[:, :, n - window :].clone(),
        valid=valid,
        positions=positions,
        scaling=scaling,
        window_cos=cos[:, n - window :].clone(),
        window_sin=sin[:, n - window :].clone(),
        future_cos=future_cos,
        future_sin=future_sin,
        accumulated_attn=attn.sum(dim=2),  # (batch, H, n)
        # a stand-in for KVzip's reconstruction attention: max over the group's heads and every prefill query
        reconstruct_attn=attn.reshape(batch, kv_heads, group, n, n).amax(dim=(2, 3)),  # (batch, G, n)
        layer_idx=layer_idx,
    )
