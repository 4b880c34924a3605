"""Per-KV-head signals: what the learned head allocator sees of each KV head of a layer (issue #17).

The per-KV-head versions of the layer signals of :mod:`polykv_learn.features` (design §6), from the same
:class:`~polykv_learn.policies.LayerStats` at the same cost ``O(w * n)`` plus one sort per head: the window
attention is averaged over the query heads of each GQA group (``LayerStats.group_mean``) instead of over all heads,
and the key norms are taken per KV head. Two layer-level columns (relative depth and ``B / n``) close the row, so
the head allocator's MLP can weigh the head signals differently by depth and budget; within one layer they are the
same for every head, and the softmax over heads ignores what every head shares.

Signals that compare policies (keep-set overlaps) and the CAKE temporal variance are layer-level choices of
policy and budget and are not split per head. AdaKV (arXiv:2407.11550) shares a layer's budget by how
concentrated each head's attention is; the entropy and coverage columns measure exactly that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polykv_learn.features import NUM_SINKS, check_signal_args
from polykv_learn.policies.base import LayerStats

__all__ = ["HEAD_FEATURE_NAMES", "head_features"]

#: columns of :func:`head_features`, in order
HEAD_FEATURE_NAMES: list[str] = [
    "head_entropy",  # mean over the group's query heads and window queries of H(attention) / log(n_valid)
    "head_sink_mass",  # mass of the group-averaged window attention on the first NUM_SINKS real positions
    "head_recent_mass",  # same on the last w positions (the observation window)
    "head_coverage@0.5B",  # mass of the top-B/2 positions of the group- and query-averaged window attention
    "head_coverage@1B",  # same at k = B
    "head_coverage@2B",  # same at k = 2B (k capped at n)
    "head_key_norm_spread",  # std / mean of the head's key L2 norms over real positions
    "depth",  # relative depth l / (L - 1) (the same for every head of the layer)
    "budget_ratio",  # B / n_valid, capped at 1 (the same for every head of the layer)
]


def head_features(stats: LayerStats, budget: int, num_layers: int) -> Tensor:
    """Signals of every KV head of one layer for every batch element: ``(batch, G, Fh)`` float32, columns as in
    :data:`HEAD_FEATURE_NAMES`; ``budget`` is the average budget ``B``, ``num_layers`` is ``L``."""
    budget = check_signal_args(stats, budget, num_layers)
    free = stats.memo("head_features", lambda: _budget_free_head_signals(stats))
    top, n_valid = free["top"], free["n_valid"]  # (batch, G, n), (batch,)
    n = stats.context_length
    coverage = [top[..., min(max(k, 1), n) - 1] for k in (budget // 2, budget, 2 * budget)]  # 3 x (batch, G)
    batch, g = top.shape[:2]
    depth = torch.full((batch, g), stats.layer_idx / max(num_layers - 1, 1), device=top.device)  # (batch, G)
    ratio = (budget / n_valid).clamp_max(1.0)[:, None].expand(batch, g)  # (batch, G)
    columns = [free["entropy"], free["sink_mass"], free["recent_mass"], *coverage, free["spread"], depth, ratio]
    return torch.stack(columns, dim=-1).float()  # (batch, G, Fh)


def _budget_free_head_signals(stats: LayerStats) -> dict[str, Tensor]:
    """The budget-free part of :func:`head_features`, once per layer statistics (each ``(batch, G)``, ``top``
    ``(batch, G, n)``, ``n_valid`` ``(batch,)``)."""
    attn = stats.window_attn.float()  # (batch, H, w, n)
    valid = stats.valid.to(attn.device)  # (batch, n)
    _, _, w, n = attn.shape
    n_valid = valid.sum(dim=-1).clamp_min(1).float()  # (batch,)
    log_n = n_valid.log()[:, None]  # (batch, 1)
    entropy = stats.group_mean(-torch.xlogy(attn, attn).sum(dim=-1).mean(dim=2))  # (batch, G)
    norm_entropy = torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), torch.zeros_like(entropy))

    sinks = (stats.positions.to(attn.device) < NUM_SINKS) & valid  # (batch, n)
    recent = (torch.arange(n, device=attn.device) >= n - w)[None, :] & valid  # (batch, n)
    mass = stats.group_mean(attn.mean(dim=2))  # (batch, G, n) group- and query-averaged window attention
    sink_mass = (mass * sinks[:, None]).sum(dim=-1)  # (batch, G)
    recent_mass = (mass * recent[:, None]).sum(dim=-1)  # (batch, G)
    top = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)  # (batch, G, n)

    norms = stats.keys.float().norm(dim=-1)  # (batch, G, n)
    vmask = valid[:, None, :].float()  # (batch, 1, n)
    count = n_valid[:, None]  # (batch, 1)
    mean_norm = (norms * vmask).sum(dim=-1) / count  # (batch, G)
    std_norm = (((norms - mean_norm[..., None]) ** 2 * vmask).sum(dim=-1) / count).sqrt()  # (batch, G)
    spread = std_norm / mean_norm.clamp_min(1e-12)  # (batch, G)
    return {
        "n_valid": n_valid,
        "entropy": norm_entropy,
        "sink_mass": sink_mass,
        "recent_mass": recent_mass,
        "top": top,
        "spread": spread,
    }
