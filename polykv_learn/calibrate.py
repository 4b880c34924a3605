"""Calibration: per-layer sensitivity curves from the simulator, a policy per layer, budgets with an exact total.

1. :func:`sensitivity_curves`: on calibration samples (context, probe), the loss ``loss[l, p, k]`` = mean over the
   samples of KL(full || plan) for the plan in which **only layer l** uses policy ``p`` at budget ``grid[k]`` and
   every other layer follows a base plan: the full cache (``base=None``, the default: a full layer changes
   nothing, so ``c_l(n) = 0``), or the uniform baseline at B (``base=``, e.g. the best uniform policy at B, see
   :func:`uniform_losses`; then ``c_l(n)``, layer ``l`` whole and the others at the base, is measured too:
   ``full_loss``). These plans share the base layers below their own, so the simulator's layer reuse
   (:mod:`polykv_learn.prefix_reuse`) runs each probe pass mostly above the changed layer.
2. :func:`choose_policies`: each layer's policy of lowest mean loss over the grid.
3. :func:`allocate_budgets`: integer budgets ``b_l`` in ``[b_min, n]`` with ``sum_l b_l = L * B`` exactly that
   minimise ``sum_l c_l(b_l)``, where ``c_l`` interpolates layer ``l``'s curve linearly between grid points (and
   ``c_l(n)``), taken as its lower convex hull. Greedy on the hull segments, steepest decrease first, is optimal
   for convex separable costs; the breakpoints are integers, so the result is integral.
4. :func:`refine_plan`: the whole plan refined jointly by the simulator-driven search of :mod:`polykv_learn.search`
   (its moves keep the exact total), on the mean KL over every calibration sample; a move is taken only if it
   lowers that mean, so the result is never worse than the best start.

This is PolyKV's static composition (arXiv:2606.15157): one offline calibration, one fixed (policy, budget) per
layer for every input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from polykv_learn.plan import Plan
from polykv_learn.policies import get_policy
from polykv_learn.search import _Scorer, neighbours
from polykv_learn.simulator import ContextCapture, Simulator


@dataclass
class SensitivityCurves:
    """``loss`` (L, len(policies), len(grid)): mean KL when only layer l uses ``policies[p]`` at ``grid[k]`` (the
    others at the base plan); ``full_loss`` (L,): layer l whole, the others at the base (zeros for the full base)."""

    policies: list[str]
    grid: list[int]
    loss: Tensor
    full_loss: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def chosen(self, policies: Sequence[str]) -> Tensor:
        """(L, len(grid)) the curve of each layer's policy in ``policies``."""
        return torch.stack([self.loss[layer, self.policies.index(p)] for layer, p in enumerate(policies)])


@dataclass
class Calibration:
    """The calibration samples, prefilled once: per sample its capture and its scorer (KL to the full cache over
    the probe, memoised per plan); ``context_length``: the shortest context (the plans' upper bound)."""

    captures: list[ContextCapture]
    scorers: list[_Scorer]

    @property
    def context_length(self) -> int:
        return min(c.context_length for c in self.captures)

    def mean_loss(self, plans: Sequence[Plan]) -> list[float]:
        """Mean over the samples of each plan's KL (float64 sum of each sample's float32 KL)."""
        totals = torch.zeros(len(plans), dtype=torch.float64)
        for scorer in self.scorers:
            totals += torch.tensor(scorer(list(plans)), dtype=torch.float64)
        return (totals / len(self.scorers)).tolist()


def prefill_samples(
    sim: Simulator, samples: Sequence[tuple[Tensor, Tensor]], policies: Sequence[str], plans_per_pass: int = 32
) -> Calibration:
    """Prefill every ``(context ids, probe ids)`` sample once, with the statistics ``policies`` need."""
    if not samples:
        raise ValueError("calibration needs at least one sample")
    if plans_per_pass < 1:
        raise ValueError(f"plans_per_pass must be >= 1, got {plans_per_pass}")
    used = [get_policy(p) for p in policies]  # unknown names fail here, before any prefill
    captures, scorers = [], []
    for context, probe in samples:
        capture = sim.capture(
            context,
            accumulate=any(p.needs_accumulated_attn for p in used) or None,
            reconstruct=any(p.needs_reconstruct_attn for p in used) or None,
        )
        probe = probe[None] if probe.ndim == 1 else probe  # (1, m)
        captures.append(capture)
        scorers.append(_Scorer(sim, capture, probe.long(), 0, "kl", plans_per_pass))
    return Calibration(captures, scorers)


def sweep_plans(
    num_layers: int, n: int, policies: Sequence[str], grid: Sequence[int], base: Plan | None = None
) -> list[Plan]:
    """The sweep's plans, layer-major (layer, policy, budget): layer l at (p, min(b, n)), every other layer at
    ``base`` (None: full, n)."""
    base_names = list(base.policies) if base is not None else [policies[0]] * num_layers
    base_budgets = list(base.budgets) if base is not None else [n] * num_layers
    plans = []
    for layer in range(num_layers):
        for policy in policies:
            for budget in grid:
                budgets, names = list(base_budgets), list(base_names)
                budgets[layer], names[layer] = min(budget, n), policy
                plans.append(Plan.from_lists(names, budgets))
    return plans


def full_layer_plans(num_layers: int, n: int, base: Plan) -> list[Plan]:
    """Layer l whole (budget n), every other layer at ``base``, for l = 0..L-1."""
    plans = []
    for layer in range(num_layers):
        budgets = list(base.budgets)
        budgets[layer] = n
        plans.append(Plan.from_lists(base.policies, budgets))
    return plans


def sensitivity_curves(
    sim: Simulator,
    samples: Sequence[tuple[Tensor, Tensor]] | Calibration,
    policies: Sequence[str],
    grid: Sequence[int],
    plans_per_pass: int = 32,
    base: Plan | None = None,
) -> SensitivityCurves:
    """Mean over the samples ((context ids, probe ids) pairs, or a :func:`prefill_samples`) of the single-layer
    sweep's KL to the full cache; the other layers at ``base`` (None: full; a base plan's budgets are capped at each
    sample's context length)."""
    if not policies or not grid or min(grid) < 1:
        raise ValueError(f"need at least one policy and positive grid budgets, got {list(policies)}, {list(grid)}")
    calib = samples if isinstance(samples, Calibration) else prefill_samples(sim, samples, policies, plans_per_pass)
    num_layers = sim.dims.num_layers
    if base is not None:
        base.check_num_layers(num_layers)
    total = torch.zeros(num_layers * len(policies) * len(grid), dtype=torch.float64)
    full_total = torch.zeros(num_layers if base is not None else 0, dtype=torch.float64)
    for capture, scorer in zip(calib.captures, calib.scorers, strict=True):
        n = capture.context_length
        sample_base = None if base is None else Plan.from_lists(base.policies, [min(b, n) for b in base.budgets])
        total += torch.tensor(scorer(sweep_plans(num_layers, n, policies, grid, sample_base)), dtype=torch.float64)
        if sample_base is not None:
            full_total += torch.tensor(scorer(full_layer_plans(num_layers, n, sample_base)), dtype=torch.float64)
    count = len(calib.captures)
    loss = (total / count).reshape(num_layers, len(policies), len(grid))
    return SensitivityCurves(policies=list(policies), grid=list(grid), loss=loss, full_loss=full_total / count)


def uniform_losses(calib: Calibration, policies: Sequence[str], budget: int) -> dict[str, float]:
    """Mean KL of each uniform single-policy plan at ``budget`` (the baselines; the lowest is the best uniform)."""
    num_layers = calib.captures[0].num_layers
    plans = [Plan.uniform(p, budget, num_layers) for p in policies]
    return dict(zip(policies, calib.mean_loss(plans), strict=True))


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


def allocate_budgets(
    loss: Tensor, grid: Sequence[int], average_budget: int, b_min: int, n: int, full_loss: Tensor | None = None
) -> list[int]:
    """Integer budgets in ``[b_min, n]`` summing to ``L * average_budget`` exactly, minimising the sum of the layers'
    interpolated costs (``loss`` (L, K) over ``grid``; ``full_loss`` (L,) the cost of a whole layer, None or empty:
    0; see the module docstring)."""
    num_layers = loss.shape[0]
    if loss.ndim != 2 or loss.shape[1] != len(grid):
        raise ValueError(f"loss must be (layers, {len(grid)} grid budgets), got {tuple(loss.shape)}")
    whole = [0.0] * num_layers if full_loss is None or full_loss.numel() == 0 else [float(x) for x in full_loss]
    if len(whole) != num_layers:
        raise ValueError(f"full_loss must have one value per layer ({num_layers}), got {len(whole)}")
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
        costs[n] = whole[layer]  # a whole layer: nothing evicted there
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
    budgets = allocate_budgets(curves.chosen(policies), curves.grid, average_budget, b_min, n, curves.full_loss)
    return Plan.from_lists(policies, budgets)


@dataclass(frozen=True)
class Refined:
    """:func:`refine_plan`'s result: the plan and its mean KL, the best start and its loss, the accepted moves."""

    plan: Plan
    loss: float
    start_plan: Plan
    start_loss: float
    moves: tuple[str, ...]
    evaluated: int


@torch.no_grad()
def refine_plan(
    calib: Calibration,
    starts: Sequence[Plan],
    budget: int,
    policies: Sequence[str],
    *,
    b_min: int = 1,
    rounds: int = 2,
    deltas: tuple[int, ...] | None = None,
) -> Refined:
    """Greedy joint refinement on the mean calibration KL: start from the best of ``starts`` (each with the total
    ``L * budget`` within ``[min(b_min, budget), n]``, n the shortest context), then at most ``rounds`` rounds of
    :func:`polykv_learn.search.neighbours` (budget transfers, policy swaps), taking the best neighbour only if it
    lowers the mean; so the loss never rises above the best start's."""
    if not starts:
        raise ValueError("refine_plan needs at least one start plan")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    n, pool = calib.context_length, list(dict.fromkeys(policies))
    losses = calib.mean_loss(starts)
    best = min(range(len(starts)), key=lambda i: (losses[i], i))
    plan, value = starts[best], losses[best]
    start_plan, start_loss, moves = plan, value, []
    for _ in range(rounds if n > budget else 0):
        cands = neighbours(plan, budget, n, pool, b_min=b_min, deltas=deltas)
        if not cands:
            break
        scores = calib.mean_loss([c for _, c in cands])
        i = min(range(len(cands)), key=lambda k: (scores[k], k))
        if not scores[i] < value:
            break
        plan, value = cands[i][1], scores[i]
        moves.append(cands[i][0])
    evaluated = len(calib.scorers[0].memo)
    return Refined(plan, value, start_plan, start_loss, tuple(moves), evaluated)
