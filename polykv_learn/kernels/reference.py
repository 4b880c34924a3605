"""Torch reference for the simulator's masked attention: exact, differentiable, any dtype (float64 for tests)."""

from __future__ import annotations

import torch
from torch import Tensor


def context_attention_reference(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Probe queries x shared context keys with an additive key bias. Returns ``(out, lse)``.

    q: (P, H, m, d); k, v: (G, n, d); bias: (P, G, n), or (P, G, m, n) for a bias per query (a sliding window)
    -> out (P, H, m, d), lse (P, H, m) float32.
    Computed in float32 (float64 stays float64); fully masked rows give out = 0, lse = -inf.
    """
    p, h, m, d = q.shape
    g = k.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).reshape(p, g, h // g, m, d)  # (P, G, H/G, m, d)
    scores = torch.einsum("pgrmd,gnd->pgrmn", qg, k.to(acc)) * scaling  # (P, G, H/G, m, n)
    per_query = bias.to(acc)[:, :, None, :, :] if bias.ndim == 4 else bias.to(acc)[:, :, None, None, :]
    scores = scores + per_query
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    exps = torch.exp(scores - top)  # fully masked rows: all zeros
    total = exps.sum(dim=-1)  # (P, G, H/G, m)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))  # no 0/0 in the gradients of masked rows
    lse = torch.where(seen, torch.log(safe_total) + top[..., 0], torch.full_like(total, float("-inf")))
    probs = exps / safe_total[..., None]
    out = torch.einsum("pgrmn,gnd->pgrmd", probs, v.to(acc))
    return out.reshape(p, h, m, d).to(q.dtype), lse.reshape(p, h, m).to(torch.float32 if acc != torch.float64 else acc)


def causal_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, scaling: float, sliding_window: int | None = None
) -> tuple[Tensor, Tensor]:
    """Causal self-attention of the probe block: q (P, H, m, d), k/v (P, G, m, d) -> out (P, H, m, d), lse (P, H, m);
    ``sliding_window`` W: a query sees only the keys less than W positions before it."""
    p, h, m, d = q.shape
    g = k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).reshape(p, g, h // g, m, d)
    scores = torch.einsum("pgrid,pgjd->pgrij", qg, k.to(acc)) * scaling  # (P, G, H/G, m, m)
    causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
    if sliding_window is not None:
        causal = causal.triu(1 - sliding_window)
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # never -inf: the diagonal is always visible
    out = torch.einsum("pgrij,pgjd->pgrid", torch.exp(scores - lse[..., None]), v.to(acc))
    return out.reshape(p, h, m, d).to(q.dtype), lse.reshape(p, h, m)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Combine two attentions over disjoint key sets by their log-sum-exps: (P, H, m, d) x2 -> (P, H, m, d).

    A side whose lse is -inf (all keys masked) gets weight 0; both sides fully masked is not allowed here
    (the probe block always sees its own diagonal).
    """
    acc = lse_b.dtype if lse_b.dtype == torch.float64 else torch.float32
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    top = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - top)[..., None]  # exp(-inf - finite) = 0
    w_b = torch.exp(lse_b - top)[..., None]
    merged = (out_a.to(acc) * w_a + out_b.to(acc) * w_b) / (w_a + w_b)
    return merged.to(out_a.dtype)
