"""No-grad CPU path of the simulator's context attention for hard plans: attend to the kept keys only.

A hard plan's bias is 0 on its keep set and -inf elsewhere, so the evicted keys add nothing to the softmax. This
path gathers, per (plan, KV head), the kept positions (in their original order) and runs the attention over them
alone: the work per plan falls from ``n`` keys to the plan's largest per-head keep count at that layer. Plans are
grouped by that count (power-of-two widths), so a small-budget plan is not padded to a large one; a group whose
width reaches ``n`` reads the shared K/V directly (no copy). Same shapes and conventions as
:func:`polykv_learn.kernels.reference.context_attention_reference` (fully masked rows: out 0, lse -inf).

Only used without autograd (``torch.is_grad_enabled()`` false or nothing requires grad), for float32 and
lower-precision inputs, and when every bias entry is exactly 0 or -inf (:func:`is_hard_bias`); otherwise the
dispatcher keeps the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polykv_learn.kernels.reference import context_attention_reference


def is_hard_bias(bias: Tensor) -> bool:
    """True when every entry of ``bias`` is 0 or -inf (a hard keep mask)."""
    return bool(((bias == 0) | torch.isneginf(bias)).all())


def applies(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> bool:
    """Whether :func:`gathered_context_attention` may replace the reference for these inputs."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    return not needs_grad and q.dtype != torch.float64 and is_hard_bias(bias)


def _widths(counts: Tensor, n: int) -> Tensor:
    """Bucket width of each plan: its largest keep count rounded up to a power of two (at least 16), capped at n."""
    top = counts.clamp(min=1).to(torch.float32)
    width = torch.exp2(torch.ceil(torch.log2(top))).long().clamp(min=16)
    return width.clamp(max=n)


@torch.no_grad()
def gathered_context_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Probe queries x each plan's kept context keys. q (P, H, m, d); k, v (G, n, d); bias (P, G, n) of 0 / -inf
    -> out (P, H, m, d) in q's dtype, lse (P, H, m) float32."""
    p, h, m, d = q.shape
    g, n, _ = k.shape
    r = h // g
    kept = bias == 0  # (P, G, n)
    counts = kept.sum(-1)  # (P, G)
    widths = _widths(counts.amax(-1), n)  # (P,)
    out = torch.empty(p, h, m, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(p, h, m, dtype=torch.float32, device=q.device)
    for width in torch.unique(widths).tolist():
        rows = torch.nonzero(widths == width).flatten()  # plans of this bucket
        if width >= n:  # nothing to gather: the reference over the shared K/V
            out[rows], lse[rows] = context_attention_reference(q[rows], k, v, bias[rows], scaling)
            continue
        pb = rows.numel()
        order = torch.argsort((~kept[rows]).to(torch.int8), dim=-1, stable=True)[..., :width]  # (Pb, G, w) kept first
        valid = torch.arange(width, device=q.device) < counts[rows][..., None]  # (Pb, G, w)
        index = order[..., None].expand(pb, g, width, d)
        kg = torch.gather(k.float()[None].expand(pb, g, n, d), 2, index)  # (Pb, G, w, d)
        vg = torch.gather(v.float()[None].expand(pb, g, n, d), 2, index)
        qg = q[rows].float().reshape(pb, g, r * m, d)  # (Pb, G, R*m, d): a group's query heads share its keys
        scores = torch.matmul(qg, kg.transpose(-1, -2)).mul_(scaling)  # (Pb, G, R*m, w)
        scores.masked_fill_(~valid[:, :, None, :], float("-inf"))
        top = scores.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        exps = scores.sub_(top).exp_()  # fully masked rows: all zeros
        total = exps.sum(-1)  # (Pb, G, R*m)
        seen = total > 0
        safe = torch.where(seen, total, torch.ones_like(total))
        o = torch.matmul(exps, vg).div_(safe[..., None])  # (Pb, G, R*m, d)
        l_b = torch.where(seen, safe.log() + top[..., 0], torch.full_like(total, float("-inf")))
        out[rows] = o.reshape(pb, h, m, d).to(q.dtype)
        lse[rows] = l_b.reshape(pb, h, m)
    return out, lse
