"""The learned head allocator: shares each layer's budget among its KV heads (issue #17).

For layer ``l`` with (real) layer budget ``b_l`` and standardised per-head signals ``f_{l,h}``
(:mod:`polykv_learn.head_features`), ``z_{l,h} = g(f_{l,h})`` (one small MLP shared by every layer and head) and

    b_{l,h} = Proj_l(G * b_l * softmax_h(z_{l,h})),

``Proj_l`` = :func:`~polykv_learn.budgets.project_budgets` onto ``sum_h b_{l,h} = G * b_l`` exactly with every
``b_{l,h}`` in ``[min(b_min, b_l), n]``. Deployment rounds each layer with
:func:`~polykv_learn.budgets.round_preserving_sum` (projection in float64), so the integer head budgets of a layer sum
to exactly ``G * b_l``. The last linear layer starts at zero: an untrained head allocator splits every layer evenly,
which is no head allocation (every head keeps ``b_l``).

Training differentiates through the projection in the logits (as the layer allocator does) and in the layer budget
``b_l`` (the layer allocator's output): on a segment where the heads ``F`` are strictly inside the bounds,
``d b_{l,h} / d b_l = G * w_h / sum_{k in F} w_k`` for ``h in F`` and 0 for a clamped head.

Head-wise budgets under a layer's fixed total are AdaKV's (Feng et al., arXiv:2407.11550); learning the split end to
end through the simulator is PolyKV's allocator (arXiv:2606.15157) one level down.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polykv_learn.budgets import project_budgets, round_preserving_sum
from polykv_learn.planner.allocator import mlp

__all__ = ["HEAD_ALLOCATIONS", "HeadAllocator"]

#: how a layer's budget is shared among its KV heads: equally (``none``), by this learned allocator (``learned``), or by
#: AdaKV's rule from the prefill's scores (``adakv``, :mod:`polykv_learn.headwise`; nothing to train)
HEAD_ALLOCATIONS = ("none", "learned", "adakv")


class HeadAllocator(nn.Module):
    """Maps standardised per-head signals ``(L, G, Fh)`` and layer budgets ``(L,)`` to head budgets ``(L, G)``."""

    def __init__(self, num_features: int, hidden: int = 32, num_hidden_layers: int = 1) -> None:
        super().__init__()
        self.num_features = num_features
        self.hidden = hidden
        self.num_hidden_layers = num_hidden_layers
        self.net = mlp(num_features, hidden, num_hidden_layers, 1)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def logits(self, head_features: Tensor) -> Tensor:
        """``z``: ``(L, G, Fh) -> (L, G)``."""
        if head_features.ndim != 3 or head_features.shape[-1] != self.num_features:
            raise ValueError(
                f"head features must have shape (L, G, {self.num_features}) (one row per layer and KV head), got "
                f"{tuple(head_features.shape)}"
            )
        return self.net(head_features).squeeze(-1)  # (L, G)

    def forward(self, head_features: Tensor, layer_budgets: Tensor, context_length: int, b_min: int = 1) -> Tensor:
        """Real head budgets ``(L, G)``: layer ``l``'s sum to ``G * b_l``, each in ``[min(b_min, b_l), n]``
        (differentiable in the logits and in ``layer_budgets`` ``(L,)``, which must lie in ``(0, n]``)."""
        z = self.logits(head_features)  # (L, G)
        _check_layer_budgets(layer_budgets, z.shape[0], context_length)
        rows = [_split(z[layer], layer_budgets[layer], context_length, b_min) for layer in range(z.shape[0])]
        return torch.stack(rows).to(z.dtype)  # (L, G)

    @torch.no_grad()
    def integer_budgets(
        self, head_features: Tensor, layer_budgets: list[int], context_length: int, b_min: int = 1
    ) -> list[tuple[int, ...]]:
        """Integer head budgets: per layer ``G`` integers summing to exactly ``G * b_l`` within
        ``[min(b_min, b_l), n]``; a layer with ``b_l >= n`` keeps everything (``(b_l,) * G``, as
        :func:`polykv_learn.headwise.split_heads`). Projection in float64, so an untrained allocator gives
        ``(b_l,) * G`` exactly."""
        z = self.logits(head_features).double()  # (L, G)
        if len(layer_budgets) != z.shape[0]:
            raise ValueError(f"need one layer budget per layer ({z.shape[0]}), got {len(layer_budgets)}")
        g = z.shape[1]
        out = []
        for layer, b in enumerate(layer_budgets):
            if isinstance(b, bool) or int(b) != b or b < 1:
                raise ValueError(f"layer budgets must be positive integers, got {b!r} at layer {layer}")
            b = int(b)
            if b >= context_length:
                out.append((b,) * g)
                continue
            real = _split(z[layer], torch.tensor(float(b), dtype=torch.float64), context_length, b_min)
            lower = min(b_min, b)
            out.append(tuple(round_preserving_sum(real, g * b, lower=lower, upper=context_length)))
        return out


def _check_layer_budgets(layer_budgets: Tensor, num_layers: int, context_length: int) -> None:
    if layer_budgets.shape != (num_layers,):
        raise ValueError(f"layer budgets must have shape ({num_layers},), got {tuple(layer_budgets.shape)}")
    lo, hi = float(layer_budgets.detach().min()), float(layer_budgets.detach().max())
    if not 0 < lo or hi > context_length * (1 + 1e-6):
        raise ValueError(f"layer budgets must lie in (0, n={context_length}], got values in [{lo}, {hi}]")


def _split(z: Tensor, layer_budget: Tensor, context_length: int, b_min: int) -> Tensor:
    """One layer: ``(G,)`` real head budgets from logits ``z`` ``(G,)`` and the layer budget (a 0-d tensor)."""
    g = z.shape[0]
    b = float(layer_budget.detach())
    total = g * min(b, float(context_length))
    lower = min(float(b_min), b)
    weights = torch.softmax(z.double(), dim=0)  # (G,) float64
    out = project_budgets(weights, total, lower=lower, upper=float(context_length))  # (G,), exact total
    if layer_budget.requires_grad:  # d out / d b_l on the current segment: G * w_h / sum_free w, 0 when clamped
        free = (out.detach() > lower) & (out.detach() < context_length)  # (G,)
        if bool(free.any()):
            share = torch.where(free, weights.detach(), torch.zeros_like(weights)) / weights.detach()[free].sum()
            out = out + g * (layer_budget.double() - layer_budget.detach().double()) * share
    return out
