"""Differentiable plans: soft keep weights and policy mixtures as key biases for the simulator (design §4).

A position of rank ``r`` under a policy (0 = kept first) at layer budget ``b`` has soft keep weight
``sigmoid((b - r - 1/2) / tau)``: about 1 inside the keep set, 0 outside, and ``sum_j w_j ~= b``. A routing
distribution ``pi`` over policies mixes them, ``w = sum_p pi_p w_p``, and the simulator sees ``log(w + eps)``.
As ``tau -> 0`` and ``pi`` becomes one-hot this is exactly the hard keep mask of the deployed plan.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6


def soft_keep_weights(ranks: Tensor, budgets: Tensor, tau: float | Tensor) -> Tensor:
    """ranks (Pol, G, n), budgets (R,) layer budgets or (R, G) head budgets -> weights (R, Pol, G, n) in (0, 1)."""
    b = budgets[:, None, None, None] if budgets.ndim == 1 else budgets[:, None, :, None]
    tau = torch.as_tensor(tau, dtype=b.dtype, device=b.device).reshape(-1, 1, 1, 1)
    return torch.sigmoid((b - ranks[None].to(b.dtype) - 0.5) / tau)


def soft_key_bias(ranks: Tensor, probs: Tensor, budgets: Tensor, tau: float | Tensor, eps: float = EPS) -> Tensor:
    """Key bias (R, G, n) of R soft plans at one layer.

    ranks: (Pol, G, n) rank of each position under each routed policy; probs: (R, Pol) routing distribution of
    each row; budgets: (R,) real layer budgets, or (R, G) real head budgets (each KV head its own); tau: softness
    in rank units (scalar or (R,)).
    """
    weights = soft_keep_weights(ranks, budgets, tau)  # (R, Pol, G, n)
    mixed = torch.einsum("rp,rpgn->rgn", probs.to(weights.dtype), weights)  # (R, G, n)
    return torch.log(mixed + eps)


def annealed(start: float, end: float, progress: float) -> float:
    """Geometric interpolation from ``start`` (progress 0) to ``end`` (progress >= 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return float(start * (end / start) ** progress)
