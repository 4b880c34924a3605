"""The differentiable per-layer budget allocator (design §6).

``z_l = g(f_l)`` with ``g`` a small MLP shared across layers (depth is one of the features), and
``b = Proj(L * B * softmax(z))`` where ``Proj`` (:func:`~polykv_learn.plan.project_budgets`) clamps every
budget to ``[b_min, n]`` and redistributes the excess so that ``sum_l b_l = L * B`` exactly; it is
differentiable almost everywhere. At deployment the budgets are rounded with the largest-remainder rule
(:func:`~polykv_learn.plan.round_preserving_sum`), so the integers still sum to ``L * B``.

Non-uniform layer budgets under a fixed total follow PyramidKV (arXiv:2406.02069) and CAKE (arXiv:2503.12491);
learning them end to end is PolyKV's allocator (arXiv:2606.15157).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polykv_learn.plan import project_budgets, round_preserving_sum

__all__ = ["BudgetAllocator"]


def mlp(num_features: int, hidden: int, num_hidden_layers: int, out: int) -> nn.Sequential:
    """The planner's small MLPs (router, allocator, head allocator): ``num_hidden_layers`` GELU layers of width
    ``hidden``, then a linear layer to ``out``; bad sizes are a one-line ValueError."""
    if num_features < 1 or hidden < 1 or num_hidden_layers < 0:
        raise ValueError(
            f"need num_features >= 1, hidden >= 1, num_hidden_layers >= 0; got {num_features}, {hidden}, "
            f"{num_hidden_layers}"
        )
    layers: list[nn.Module] = []
    width = num_features
    for _ in range(num_hidden_layers):
        layers += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class BudgetAllocator(nn.Module):
    """Maps standardised layer features ``(L, F)`` to real budgets ``(L,)`` summing to ``L * B``.

    The last linear layer starts at zero, so an untrained allocator returns the uniform split ``b_l = B``; with a
    ``prior`` feature column (an allocation prior, :mod:`polykv_learn.kvzip_global`) it starts at that column's
    allocation, ``b_l`` proportional to ``exp(raw column)``, and learns a gain on it next to the MLP.
    """

    def __init__(
        self, num_features: int, hidden: int = 32, num_hidden_layers: int = 1, prior: int | None = None
    ) -> None:
        super().__init__()
        if prior is not None and not 0 <= prior < num_features:
            raise ValueError(f"prior must be a feature column in [0, {num_features}), got {prior}")
        self.num_features = num_features
        self.hidden = hidden
        self.num_hidden_layers = num_hidden_layers
        self.prior = prior
        self.net = mlp(num_features, hidden, num_hidden_layers, 1)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        if prior is not None:
            self.prior_gain = nn.Parameter(torch.ones(()))  # learned; 1: follow the prior exactly
            self.register_buffer("prior_scale", torch.ones(()))  # the prior column's standard deviation

    def set_prior_scale(self, std: float) -> None:
        """The standard deviation of the prior column in the feature scaler (the allocator sees standardised
        features; ``std * scaled`` is the raw column up to a shift, which the softmax ignores)."""
        if self.prior is None:
            raise ValueError("this allocator has no prior column")
        if not std > 0:
            raise ValueError(f"the prior column's standard deviation must be positive, got {std}")
        self.prior_scale.fill_(float(std))

    def logits(self, features: Tensor) -> Tensor:
        """``z``: ``(L, F) -> (L,)``; with a prior column ``k``, ``net(f) + gain * std_k * f[:, k]``."""
        if features.ndim != 2 or features.shape[-1] != self.num_features:
            raise ValueError(
                f"features must have shape (L, {self.num_features}) (one row per layer), got {tuple(features.shape)}"
            )
        z = self.net(features).squeeze(-1)  # (L,)
        if self.prior is not None:
            z = z + self.prior_gain * self.prior_scale * features[:, self.prior]
        return z

    def forward(self, features: Tensor, budget: float, context_length: int, b_min: int = 1) -> Tensor:
        """Real budgets ``(L,)`` with ``sum = L * budget`` and every ``b_l`` in ``[min(b_min, n), n]``.

        When ``context_length <= budget`` nothing is evicted (design §2): every layer gets ``n`` (the sum is
        then ``L * n``, below ``L * budget``).
        """
        return self._budgets(self.logits(features), budget, context_length, b_min)

    @torch.no_grad()
    def integer_budgets(self, features: Tensor, budget: int, context_length: int, b_min: int = 1) -> list[int]:
        """Integer budgets summing to exactly ``L * budget`` (or ``n`` everywhere when ``n <= budget``); the
        projection runs in float64 so that an untrained allocator rounds to exactly ``budget`` everywhere."""
        if isinstance(budget, bool) or int(budget) != budget:
            raise ValueError(f"budget must be an integer for integer budgets, got {budget!r}")
        real = self._budgets(self.logits(features).double(), budget, context_length, b_min)  # (L,)
        if context_length <= budget:
            return [int(context_length)] * real.shape[0]
        total = real.shape[0] * int(budget)
        return round_preserving_sum(real, total, lower=min(b_min, context_length), upper=context_length)

    @staticmethod
    def _budgets(z: Tensor, budget: float, context_length: int, b_min: int) -> Tensor:
        num_layers = z.shape[0]  # z: (L,)
        if not budget > 0:
            raise ValueError(f"budget must be positive, got {budget}")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if not 1 <= b_min <= budget:
            raise ValueError(f"b_min must be an integer in [1, budget={budget}], got {b_min}")
        if context_length <= budget:
            return z.new_full((num_layers,), float(context_length))
        total = num_layers * float(budget)
        weights = total * torch.softmax(z.double(), dim=0)  # (L,) float64: no underflow of small layers
        budgets = project_budgets(weights, total, lower=min(b_min, context_length), upper=context_length)
        return budgets.to(z.dtype)
