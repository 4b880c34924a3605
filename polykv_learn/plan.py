"""Plans: one eviction policy and one budget per layer (design §2), and the budget arithmetic behind them.

A plan ``[(policy_l, b_l)]`` keeps ``b_l`` context positions per KV head at layer ``l``, counting every kept
position (sinks and observation window included). Constructors build the layer-allocation baselines:

- :meth:`Plan.uniform`: the same budget everywhere;
- :meth:`Plan.pyramid`: PyramidKV's linear schedule (Cai et al., arXiv:2406.02069);
- :meth:`Plan.cake`: CAKE's budget proportional to ``entropy^a * variance^b`` of the window attention
  (Qin et al., arXiv:2503.12491), on top of :meth:`Plan.from_allocation`.

Two helpers keep totals exact: :func:`project_budgets` (differentiable almost everywhere, used by the learned
allocator) and :func:`round_preserving_sum` (largest-remainder rounding, used at deployment).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from polykv_learn.policies import check_policy_name

__all__ = ["Plan", "project_budgets", "round_preserving_sum"]


def _check_feasible(num_layers: int, total: float, lower: float, upper: float) -> None:
    if num_layers < 1:
        raise ValueError("need at least one layer (got an empty list of values)")
    if lower > upper:
        raise ValueError(f"lower bound {lower} exceeds upper bound {upper}")
    if total < num_layers * lower - 1e-9 * max(1.0, abs(total)):
        raise ValueError(
            f"infeasible budgets: total {total} is below {num_layers} layers x lower bound {lower} "
            f"= {num_layers * lower}"
        )
    if total > num_layers * upper + 1e-9 * max(1.0, abs(total)):
        raise ValueError(
            f"infeasible budgets: total {total} is above {num_layers} layers x upper bound {upper} "
            f"= {num_layers * upper}"
        )


def project_budgets(weights: Tensor, total: float, lower: float, upper: float = math.inf) -> Tensor:
    """Scale non-negative ``weights`` (L,) to budgets summing to ``total``, each in ``[lower, upper]``.

    Start from ``b = total * weights / sum(weights)``; layers outside the bounds are clamped and the excess
    (or deficit) is redistributed proportionally among the unclamped layers, until the sum is ``total``. The
    fixed point of that procedure is ``b_l = clip(c * w_l, lower, upper)``, the scalar ``c`` chosen so that
    ``sum_l b_l = total``; it is computed exactly here from the ``2L`` breakpoints of the piecewise-linear,
    non-decreasing map ``c -> sum_l clip(c * w_l, lower, upper)``. The result is differentiable almost
    everywhere in ``weights`` (through ``c`` and the unclamped layers; clamped layers are constants).

    Layers with zero weight sit at ``lower`` unless the positive-weight layers are all at ``upper`` and budget
    is left over; it is then shared equally among the zero-weight layers (limit of tiny positive weights).

    Raises ValueError if ``total`` is outside ``[L * lower, L * upper]`` or the weights are negative, not
    finite or all zero. Returns a tensor (L,) of the weights' floating dtype.
    """
    if weights.ndim != 1:
        raise ValueError(f"weights must be a 1-D tensor (one per layer), got shape {tuple(weights.shape)}")
    dtype = weights.dtype if weights.is_floating_point() else torch.float64
    return _project(weights.double(), float(total), float(lower), float(upper)).to(dtype)


def _project(w: Tensor, total: float, lower: float, upper: float) -> Tensor:
    """:func:`project_budgets` on float64 weights (L,)."""
    num_layers = w.shape[0]
    if lower < 0:
        raise ValueError(f"lower bound must be >= 0, got {lower}")
    _check_feasible(num_layers, total, lower, upper)
    wd = w.detach()
    if not torch.isfinite(wd).all() or (wd < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {wd.tolist()}")
    positive = wd > 0  # (L,)
    if not positive.any():
        raise ValueError("weights are all zero: there is nothing to be proportional to")
    w = w / wd.max()  # scale-free, better conditioned; the constant does not change the result
    wd = w.detach()

    # Largest budget reachable by the positive-weight layers with the zero-weight ones at `lower`.
    num_zero = int((~positive).sum())
    reachable = int(positive.sum()) * upper + num_zero * lower
    if total > reachable:
        share = (total - int(positive.sum()) * upper) / num_zero
        return torch.where(positive, torch.full_like(w, upper), torch.full_like(w, share))

    # Breakpoints of S(c) = sum clip(c * w, lower, upper), evaluated without gradients.
    w64 = wd
    pos = w64[positive]
    candidates = torch.cat([lower / pos, pos.new_tensor([0.0])])
    if math.isfinite(upper):
        candidates = torch.cat([candidates, upper / pos])
    candidates = candidates.unique()  # sorted ascending
    sums = (candidates[:, None] * w64[None, :]).clamp(lower, upper).sum(dim=1)  # (C,)
    # First breakpoint at which S reaches the total; the solution lies in the segment that ends there.
    reach = torch.nonzero(sums >= total - 1e-12 * max(1.0, abs(total))).flatten()
    if len(reach) == 0:  # only without an upper bound: c lies beyond the last breakpoint
        mid = 2 * candidates[-1] + 1
    else:
        hi = int(reach[0])
        mid = 0.5 * (candidates[max(hi - 1, 0)] + candidates[hi])  # a value of c inside the segment
    scaled_mid = mid * w64
    at_low = scaled_mid <= lower  # (L,) clamped to lower on this segment
    at_high = scaled_mid >= upper  # (L,) clamped to upper on this segment
    free = ~(at_low | at_high)
    if not free.any():  # S is flat here: the clamped values already sum to the total
        return torch.where(at_high, torch.full_like(w, upper), torch.full_like(w, lower))
    fixed_sum = int(at_low.sum()) * lower + (int(at_high.sum()) * upper if at_high.any() else 0.0)
    c = (total - fixed_sum) / w[free].sum()  # differentiable scalar
    out = torch.where(at_low, torch.full_like(w, lower), c * w)
    if at_high.any():
        out = torch.where(at_high, torch.full_like(w, upper), out)
    return out


def round_preserving_sum(
    values: Sequence[float] | Tensor, total: int, lower: int = 1, upper: int | None = None
) -> list[int]:
    """Round real budgets to integers that sum to exactly ``total`` and lie in ``[lower, upper]``.

    ``values`` are first brought onto the constraint set with :func:`project_budgets` (a no-op, up to
    round-off, when they already sum to ``total`` within the bounds), then rounded with the largest-remainder
    rule: floor everything and hand the missing units to the largest fractional parts (ties to the earlier
    layer). Each integer is then within 1 of its real value, and the order of the values is preserved
    (``v_i >= v_j`` implies ``b_i >= b_j``). ``upper=None`` means no upper bound.

    Raises ValueError if ``total`` is outside ``[L * lower, L * upper]``.
    """
    if isinstance(values, Tensor):
        vals = values.detach().double().flatten().cpu()
    else:
        vals = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if isinstance(total, bool) or not isinstance(total, Integral):
        raise ValueError(f"total must be an integer, got {total!r}")
    total, lower = int(total), int(lower)
    hi = math.inf if upper is None else int(upper)
    _check_feasible(len(vals), total, lower, hi)
    if vals.sum() == 0 and torch.isfinite(vals).all() and not (vals < 0).any():
        vals = torch.ones_like(vals)  # all zero: nothing to be proportional to, share equally
    real = project_budgets(vals, total, lower, hi).tolist()

    base = [min(max(math.floor(v), lower), hi) for v in real]
    frac = [v - b for v, b in zip(real, base, strict=True)]
    remainder = total - sum(base)
    while remainder != 0:  # one or (after round-off) a few passes
        if remainder > 0:
            order = sorted((i for i in range(len(base)) if base[i] < hi), key=lambda i: (-frac[i], i))
            step = 1
        else:
            order = sorted((i for i in range(len(base)) if base[i] > lower), key=lambda i: (frac[i], -i))
            step = -1
        for i in order[: abs(remainder)]:
            base[i] += step
            frac[i] -= step
        remainder = total - sum(base)
    return base


def _as_budget(value: Any, layer: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"budget of layer {layer} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"budget of layer {layer} must be a positive integer (>= 1), got {value}")
    return int(value)


def _expand_policies(policy_or_list: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
    if isinstance(policy_or_list, str):
        return (policy_or_list,) * num_layers
    policies = tuple(policy_or_list)
    if len(policies) != num_layers:
        raise ValueError(f"got {len(policies)} policies for {num_layers} layers; give one per layer")
    return policies


@dataclass(frozen=True)
class Plan:
    """One policy name and one integer budget (kept positions per KV head) per layer."""

    policies: tuple[str, ...]
    budgets: tuple[int, ...]

    def __post_init__(self) -> None:
        if isinstance(self.policies, str):
            raise ValueError(f"policies must be a sequence of names, one per layer, got {self.policies!r}")
        policies = tuple(self.policies)
        budgets = tuple(self.budgets)
        if len(policies) == 0:
            raise ValueError("a plan needs at least one layer (got no policies)")
        if len(policies) != len(budgets):
            raise ValueError(f"plan has {len(policies)} policies but {len(budgets)} budgets; they must match")
        for name in policies:
            if not isinstance(name, str):
                raise ValueError(f"policy names must be strings, got {name!r}")
            check_policy_name(name)
        budgets = tuple(_as_budget(b, layer) for layer, b in enumerate(budgets))
        object.__setattr__(self, "policies", policies)
        object.__setattr__(self, "budgets", budgets)

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return len(self.budgets)

    @property
    def total_budget(self) -> int:
        return sum(self.budgets)

    @property
    def average_budget(self) -> float:
        return self.total_budget / self.num_layers

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lists(cls, policies: Sequence[str], budgets: Sequence[int]) -> Plan:
        return cls(tuple(policies), tuple(budgets))

    @classmethod
    def uniform(cls, policy: str | Sequence[str], budget: int, num_layers: int) -> Plan:
        """Every layer keeps ``budget`` positions."""
        _check_layers(num_layers)
        return cls(_expand_policies(policy, num_layers), (_as_budget(budget, 0),) * num_layers)

    @classmethod
    def pyramid(
        cls,
        policy: str | Sequence[str],
        budget: int,
        num_layers: int,
        beta: float = 20,
        context_length: int | None = None,
    ) -> Plan:
        """PyramidKV's linear schedule (Cai et al., arXiv:2406.02069, eq. for ``k^l``).

        The top (last) layer gets ``budget / beta``, the bottom (first) ``2 * budget - budget / beta``, linear
        in between, so the mean is ``budget``. Rounded with the largest-remainder rule: integers summing to
        exactly ``num_layers * budget``, non-increasing with depth, each at least 1. With ``context_length``
        ``n`` (the baseline as evaluation and validation run it): nothing is evicted when ``n <= budget``, and
        layer budgets above ``n`` are capped at ``n`` with the excess handed to the other layers.
        """
        _check_layers(num_layers)
        budget = _as_budget(budget, 0)
        if not beta >= 1:
            raise ValueError(f"beta must be >= 1 (beta=1 is uniform), got {beta}")
        if context_length is not None and context_length <= budget:
            return cls.uniform(policy, budget, num_layers)
        top = budget / beta
        bottom = 2 * budget - top
        depth = torch.arange(num_layers, dtype=torch.float64) / max(num_layers - 1, 1)  # (L,)
        values = bottom - (bottom - top) * depth if num_layers > 1 else torch.full((1,), float(budget))
        budgets = round_preserving_sum(values, num_layers * budget, lower=1)
        plan = cls(_expand_policies(policy, num_layers), tuple(budgets))
        if context_length is not None and max(plan.budgets) > context_length:
            return cls.from_allocation(policy, [float(b) for b in plan.budgets], budget, b_max=context_length)
        return plan

    @classmethod
    def from_allocation(
        cls,
        policy_or_list: str | Sequence[str],
        weights: Sequence[float] | Tensor,
        budget: int,
        b_min: int = 1,
        b_max: int | None = None,
    ) -> Plan:
        """Budgets proportional to non-negative ``weights`` (one per layer), clamped into ``[b_min, b_max]``
        with the excess redistributed, as integers summing to exactly ``len(weights) * budget``."""
        w = (
            weights.detach().double().flatten()
            if isinstance(weights, Tensor)
            else torch.tensor([float(x) for x in weights], dtype=torch.float64)
        )
        num_layers = len(w)
        _check_layers(num_layers)
        budget = _as_budget(budget, 0)
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"allocation weights must be finite and non-negative, got {w.tolist()}")
        if not (w > 0).any():
            raise ValueError("allocation weights are all zero: there is nothing to be proportional to")
        if b_min < 1:
            raise ValueError(f"b_min must be >= 1, got {b_min}")
        budgets = round_preserving_sum(w, num_layers * budget, lower=b_min, upper=b_max)
        return cls(_expand_policies(policy_or_list, num_layers), tuple(budgets))

    @classmethod
    def cake(
        cls,
        policy: str | Sequence[str],
        budget: int,
        entropies: Sequence[float] | Tensor,
        variances: Sequence[float] | Tensor,
        a: float = 1.0,
        b: float = 1.0,
        b_min: int = 1,
        b_max: int | None = None,
    ) -> Plan:
        """CAKE-style allocation (Qin et al., arXiv:2503.12491): layer preference ``entropy^a * variance^b``
        of the window attention (spatial dispersion times temporal shift), budgets proportional to it."""
        ent = torch.as_tensor(entropies, dtype=torch.float64).flatten()
        var = torch.as_tensor(variances, dtype=torch.float64).flatten()
        if ent.shape != var.shape:
            raise ValueError(f"got {len(ent)} entropies but {len(var)} variances; give one of each per layer")
        if (ent < 0).any() or (var < 0).any():
            raise ValueError("entropies and variances must be non-negative")
        weights = ent.pow(a) * var.pow(b)  # (L,)
        return cls.from_allocation(policy, weights, budget, b_min=b_min, b_max=b_max)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, list]:
        return {"policies": list(self.policies), "budgets": list(self.budgets)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        missing = {"policies", "budgets"} - set(data)
        if missing:
            raise ValueError(f"plan dict lacks {sorted(missing)}; expected keys 'policies' and 'budgets'")
        return cls(tuple(data["policies"]), tuple(data["budgets"]))

    # ------------------------------------------------------------------ use
    def check_num_layers(self, num_layers: int) -> None:
        if num_layers != self.num_layers:
            raise ValueError(f"plan has {self.num_layers} layers but the model has {num_layers}")

    def effective_budgets(self, context_length: int) -> list[int]:
        """Positions actually kept for a context of ``context_length``: budgets larger than the context mean
        keep all."""
        if context_length < 0:
            raise ValueError(f"context_length must be >= 0, got {context_length}")
        return [min(b, context_length) for b in self.budgets]

    def __iter__(self):
        return iter(zip(self.policies, self.budgets, strict=True))

    def __len__(self) -> int:
        return self.num_layers

    def __str__(self) -> str:
        width = max(len("policy"), *(len(p) for p in self.policies))
        bw = max(len("budget"), *(len(str(b)) for b in self.budgets))
        lines = [
            f"Plan: {self.num_layers} layers, total budget {self.total_budget} "
            f"(average {self.average_budget:g})",
            f"layer  {'policy':<{width}}  {'budget':>{bw}}",
        ]
        lines += [f"{i:>5}  {p:<{width}}  {b:>{bw}}" for i, (p, b) in enumerate(self)]
        return "\n".join(lines)


def _check_layers(num_layers: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
