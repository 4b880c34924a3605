"""Expected attention: the attention that future queries are expected to pay, from Gaussian query statistics.

Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution", arXiv:2510.00636; follows NVIDIA kvpress ``ExpectedAttentionPress``.

Window queries are un-rotated to pre-RoPE, summarised per query head by a mean ``mu`` and covariance
``Sigma``, and moved to the future by the RoPE rotation averaged over the next ``T`` positions, ``R_bar``.
For a Gaussian query ``q ~ N(mu_bar, Sigma_bar)``, with ``mu_bar = R_bar mu`` and
``Sigma_bar = R_bar Sigma R_bar^T``, ``log E[exp(s q.k)] = s mu_bar.k + s^2 k^T Sigma_bar k / 2`` is the
expected logit of key ``k``; a softmax over keys turns those into expected attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from polykv_learn.policies import register_policy
from polykv_learn.policies.base import LayerStats, Policy


def rotate_half(x: Tensor) -> Tensor:
    """Llama-convention RoPE helper: ``(x1, x2) -> (-x2, x1)`` over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_matrix(dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``(d, d)`` matrix ``P`` with ``P @ x == rotate_half(x)``."""
    half = dim // 2
    eye = torch.eye(half, dtype=dtype, device=device)
    p = torch.zeros(dim, dim, dtype=dtype, device=device)
    p[:half, half:] = -eye
    p[half:, :half] = eye
    return p


@register_policy
@dataclass
class ExpectedAttentionPolicy(Policy):
    """Score = expected attention of the next ``num_future`` queries (all future positions of the stats when
    None), averaged over the query heads of each group, times ``||v_j||`` when ``use_value_norm``
    (as kvpress: ``(score + epsilon) * ||v_j||``). Nothing is protected."""

    name = "expected_attention"

    num_future: int | None = None  # None: all T future positions of the stats
    use_value_norm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.num_future is not None and self.num_future < 1:
            raise ValueError(f"num_future must be >= 1 or None, got {self.num_future}")

    def scores(self, stats: LayerStats) -> Tensor:
        # Compute in at least float32 (bf16 covariances are too coarse).
        dtype = torch.promote_types(stats.keys.dtype, torch.float32)
        device = stats.keys.device
        t = stats.future_cos.shape[1] if self.num_future is None else self.num_future
        if t > stats.future_cos.shape[1]:
            raise ValueError(
                f"expected_attention num_future={t} exceeds the {stats.future_cos.shape[1]} future positions "
                "in the stats"
            )

        # Un-rotate the window queries: RoPE is y = x cos + rotate_half(x) sin,
        # so x = y cos - rotate_half(y) sin.
        y = stats.window_queries.to(dtype)  # (batch, H, w, d)
        cos = stats.window_cos.to(device, dtype)[:, None]  # (batch, 1, w, d)
        sin = stats.window_sin.to(device, dtype)[:, None]  # (batch, 1, w, d)
        x = y * cos - rotate_half(y) * sin  # (batch, H, w, d) pre-RoPE queries

        # Statistics of the real window queries only: a left-padded sequence shorter than the window has padding
        # queries in it (a sequence alone would have a shorter window of its real tokens).
        real = stats.valid[:, -x.shape[2] :].to(device, dtype)[:, None, :, None]  # (batch, 1, w, 1)
        count = real.sum(dim=2, keepdim=True).clamp(min=1)  # (batch, 1, 1, 1)
        mu = (x * real).sum(dim=2, keepdim=True) / count  # (batch, H, 1, d)
        centered = (x - mu) * real  # (batch, H, w, d)
        sigma = centered.transpose(-1, -2) @ centered / count  # (batch, H, d, d), unbiased=False
        mu = mu[:, :, 0]  # (batch, H, d)

        # Average RoPE rotation of the future positions: R_t = diag(cos_t) + diag(sin_t) P.
        d = x.shape[-1]
        cos_bar = stats.future_cos[:, :t].to(device, dtype).mean(dim=1)  # (batch, d)
        sin_bar = stats.future_sin[:, :t].to(device, dtype).mean(dim=1)  # (batch, d)
        p = rotate_half_matrix(d, dtype, device)  # (d, d)
        r_bar = torch.diag_embed(cos_bar) + sin_bar[:, :, None] * p  # (batch, d, d)

        mu_bar = torch.einsum("bij,bhj->bhi", r_bar, mu)  # (batch, H, d)
        sigma_bar = r_bar[:, None] @ sigma @ r_bar[:, None].transpose(-1, -2)  # (batch, H, d, d)

        keys = stats.keys.to(dtype).repeat_interleave(stats.group_size, dim=1)  # (batch, H, n, d)
        s = stats.scaling
        logits = s * torch.einsum("bhnd,bhd->bhn", keys, mu_bar)  # (batch, H, n)
        logits = logits + 0.5 * s * s * ((keys @ sigma_bar) * keys).sum(dim=-1)  # (batch, H, n)
        valid = stats.valid.to(device)[:, None, :]  # (batch, 1, n)
        logits = logits.masked_fill(~valid, float("-inf"))
        attn = torch.softmax(logits, dim=-1)  # (batch, H, n)

        scores = stats.group_mean(attn)  # (batch, G, n)
        if self.use_value_norm:
            scores = (scores + self.epsilon) * stats.values.to(dtype).norm(dim=-1)  # (batch, G, n)
        return scores
