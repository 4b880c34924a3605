"""Exact-total budget arithmetic (design §2): the projection of real budgets onto ``sum = total`` within bounds
(:func:`project_budgets`, differentiable almost everywhere, used by the learned allocator) and the rounding that
keeps the sum (:func:`round_preserving_sum`, largest remainder, used at deployment), and the rescaling of an
integer allocation to another total (:func:`rescale_budgets`, calibrated static plans). :mod:`polykv_learn.plan`
re-exports the first two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor

__all__ = ["project_budgets", "rescale_budgets", "round_preserving_sum"]


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


def rescale_budgets(budgets: Sequence[int], total: int, lower: int, upper: int) -> list[int]:
    """Integer ``budgets`` (L,) brought to exactly ``total`` within ``[lower, upper]``, proportionally: the fixed point
    ``clip(c * b_l, lower, upper)`` with the sum ``total`` (:func:`project_budgets`), rounded by the largest-remainder
    rule (:func:`round_preserving_sum`), so the order of the layers is kept. Budgets that already sum to ``total``
    within the bounds are returned unchanged.

    Raises ValueError for a budget that is not a positive integer or a ``total`` outside ``[L * lower, L * upper]``."""
    values = list(budgets)
    for i, b in enumerate(values):
        if isinstance(b, bool) or not isinstance(b, Integral) or b < 1:
            raise ValueError(f"budgets must be positive integers, got {b!r} at layer {i}")
    if isinstance(total, bool) or not isinstance(total, Integral):
        raise ValueError(f"total must be an integer, got {total!r}")
    _check_feasible(len(values), int(total), int(lower), int(upper))
    if sum(values) == total and all(lower <= b <= upper for b in values):
        return [int(b) for b in values]
    return round_preserving_sum([float(b) for b in values], int(total), int(lower), int(upper))
