"""Calibration: per-layer sensitivity curves from the simulator, a policy per layer, budgets with an exact total.

1. :func:`sensitivity_curves`: on calibration samples (context, probe), the loss ``loss[l, p, k]`` = mean over the
   samples of KL(full || plan) for the plan in which **only layer l** uses policy ``p`` at budget ``grid[k]`` and
   every other layer keeps everything. These plans share the full layers below their own, so the simulator's
   layer reuse (:mod:`polykv_learn.prefix_reuse`) runs each probe pass mostly above the changed layer.
2. :func:`choose_policies`: each layer's policy of lowest mean loss over the grid.
3. :func:`allocate_budgets`: integer budgets ``b_l`` in ``[b_min, n]`` with ``sum_l b_l = L * B`` exactly that
   minimise ``sum_l c_l(b_l)``, where ``c_l`` interpolates layer ``l``'s curve linearly between grid points (0 at
   ``n``: a full layer changes nothing), taken as its lower convex hull. Greedy on the hull segments, steepest
   decrease first, is optimal for convex separable costs; the breakpoints are integers, so the result is integral.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polykv_learn.plan import Plan
from polykv_learn.policies import get_policy
from polykv_learn.simulator import Simulator, kl_to_full


@dataclass
class SensitivityCurves:
    """``loss`` (L, len(policies), len(grid)): mean KL when only layer l uses ``policies[p]`` at ``grid[k]``."""

    policies: list[str]
    grid: list[int]
    loss: Tensor


def sweep_plans(num_layers: int, n: int, policies: Sequence[str], grid: Sequence[int]) -> list[Plan]:
    """The sweep's plans, layer-major (layer, policy, budget): layer l at (p, b), every other layer full (n)."""
    plans = []
    for layer in range(num_layers):
        for policy in policies:
            for budget in grid:
                budgets = [n] * num_layers
                budgets[layer] = min(budget, n)
                names = [policies[0]] * num_layers
                names[layer] = policy
                plans.append(Plan.from_lists(names, budgets))
    return plans


def sensitivity_curves(
    sim: Simulator,
    samples: Sequence[tuple[Tensor, Tensor]],
    policies: Sequence[str],
    grid: Sequence[int],
    plans_per_pass: int = 32,
) -> SensitivityCurves:
    """Mean over ``samples`` ((context ids, probe ids) pairs) of the single-layer sweep's KL to the full cache."""
    if not samples:
        raise ValueError("sensitivity_curves needs at least one calibration sample")
    if not policies or not grid or min(grid) < 1:
        raise ValueError(f"need at least one policy and positive grid budgets, got {list(policies)}, {list(grid)}")
    if plans_per_pass < 1:
        raise ValueError(f"plans_per_pass must be >= 1, got {plans_per_pass}")
    used = [get_policy(p) for p in policies]  # unknown names fail here, before any prefill
    num_layers = sim.dims.num_layers
    total = torch.zeros(num_layers * len(policies) * len(grid), dtype=torch.float64)
    for context, probe in samples:
        capture = sim.capture(
            context,
            accumulate=any(p.needs_accumulated_attn for p in used) or None,
            reconstruct=any(p.needs_reconstruct_attn for p in used) or None,
        )
        n = capture.context_length
        plans = sweep_plans(num_layers, n, policies, grid)
        with torch.no_grad():
            full_plan = Plan.uniform(policies[0], n, num_layers)
            full = sim.probe_logits(capture, probe, sim.hard_biases(capture, [full_plan]))[0]
            for start in range(0, len(plans), plans_per_pass):
                chunk = plans[start : start + plans_per_pass]
                logits = sim.probe_logits(capture, probe, sim.hard_biases(capture, chunk))
                total[start : start + len(chunk)] += kl_to_full(full, logits).double()
    loss = (total / len(samples)).reshape(num_layers, len(policies), len(grid))
    return SensitivityCurves(policies=list(policies), grid=list(grid), loss=loss)


def choose_policies(curves: SensitivityCurves) -> list[str]:
    """Each layer's policy of lowest mean loss over the grid (ties: the first listed)."""
    best = curves.loss.mean(-1).argmin(-1)  # (L,)
    return [curves.policies[i] for i in best.tolist()]


def _hull_segments(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Lower convex hull of (budget, cost) points sorted by budget -> segments (length, cost change per token)."""
    hull: list[tuple[int, float]] = []
    for b, c in points:
        while len(hull) >= 2:
            (b1, c1), (b2, c2) = hull[-2], hull[-1]
            if (c2 - c1) * (b - b1) >= (c - c1) * (b2 - b1):  # hull[-1] on or above the chord: drop it
                hull.pop()
            else:
                break
        hull.append((b, c))
    return [(b2 - b1, (c2 - c1) / (b2 - b1)) for (b1, c1), (b2, c2) in zip(hull, hull[1:], strict=False)]


def allocate_budgets(loss: Tensor, grid: Sequence[int], average_budget: int, b_min: int, n: int) -> list[int]:
    """Integer budgets in ``[b_min, n]`` summing to ``L * average_budget`` exactly, minimising the sum of the layers'
    interpolated costs (``loss`` (L, K) over ``grid``; see the module docstring)."""
    num_layers = loss.shape[0]
    if loss.ndim != 2 or loss.shape[1] != len(grid):
        raise ValueError(f"loss must be (layers, {len(grid)} grid budgets), got {tuple(loss.shape)}")
    if not 1 <= b_min <= n:
        raise ValueError(f"need 1 <= b_min <= n, got b_min={b_min}, n={n}")
    total = num_layers * average_budget
    if not num_layers * b_min <= total <= num_layers * n:
        raise ValueError(f"L * B = {total} is outside [L * b_min, L * n] = [{num_layers * b_min}, {num_layers * n}]")
    order = sorted(range(len(grid)), key=lambda k: grid[k])
    segments = []  # (cost change per token, layer, length)
    for layer in range(num_layers):
        costs = {grid[k]: float(loss[layer, k]) for k in order if b_min <= grid[k] < n}
        below = [k for k in order if grid[k] <= b_min]
        above = [k for k in order if grid[k] >= b_min]
        # at b_min: the grid value there, else the nearest grid budget's (below it if any, else above it)
        start = below[-1] if below else above[0]
        costs.setdefault(b_min, float(loss[layer, start]))
        costs[n] = 0.0  # a full layer changes nothing
        for length, slope in _hull_segments(sorted(costs.items())):
            segments.append((slope, layer, length))
    budgets = [b_min] * num_layers
    left = total - num_layers * b_min
    for _slope, layer, length in sorted(segments):  # steepest decrease first; each layer's segments stay in order
        if left == 0:
            break
        take = min(length, left)
        budgets[layer] += take
        left -= take
    return budgets


def calibrated_plan(curves: SensitivityCurves, average_budget: int, b_min: int, n: int) -> Plan:
    """The plan of :func:`choose_policies` with :func:`allocate_budgets` on each layer's chosen policy's curve."""
    policies = choose_policies(curves)
    chosen = torch.stack([curves.loss[layer, curves.policies.index(p)] for layer, p in enumerate(policies)])
    return Plan.from_lists(policies, allocate_budgets(chosen, curves.grid, average_budget, b_min, n))
