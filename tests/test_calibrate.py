"""Calibration: sweep losses equal the simulator's per-plan KL; budget allocation is exact, bounded and optimal."""

import itertools

import pytest
import torch
from model_helpers import random_ids

from polykv_learn.calibrate import allocate_budgets, calibrated_plan, sensitivity_curves, sweep_plans
from polykv_learn.simulator import Simulator


def cost_of(loss: torch.Tensor, grid: list[int], budgets: list[int], n: int) -> float:
    """Sum of the layers' costs at grid budgets (n: 0)."""
    return sum(0.0 if b == n else float(loss[layer, grid.index(b)]) for layer, b in enumerate(budgets))


@pytest.mark.parametrize("seed", range(6))
def test_allocation_equals_brute_force_on_convex_separable_costs(seed):
    gen = torch.Generator().manual_seed(seed)
    layers, n, b_min = 3, 7, 2
    grid = list(range(1, n))  # every integer budget below n: no interpolation
    scale = torch.rand(layers, 1, generator=gen) * 2
    power = 1 + torch.rand(layers, 1, generator=gen) * 2
    loss = scale * (n - torch.tensor(grid, dtype=torch.float64))[None, :] ** power  # convex, 0 at n
    for average in range(b_min, n + 1):
        budgets = allocate_budgets(loss, grid, average, b_min, n)
        assert sum(budgets) == layers * average and all(b_min <= b <= n for b in budgets)
        best = min(
            cost_of(loss, grid, list(c), n)
            for c in itertools.product(range(b_min, n + 1), repeat=layers)
            if sum(c) == layers * average
        )
        assert cost_of(loss, grid, budgets, n) == pytest.approx(best, abs=1e-9)


def test_allocation_total_and_bounds_on_a_coarse_grid():
    gen = torch.Generator().manual_seed(3)
    grid = [16, 64, 128, 256, 512]
    loss = torch.rand(30, len(grid), generator=gen).sort(dim=1, descending=True).values
    for average in (24, 100, 128, 333, 1000):
        budgets = allocate_budgets(loss, grid, average, 24, 1000)
        assert sum(budgets) == 30 * average and all(24 <= b <= 1000 for b in budgets)
    with pytest.raises(ValueError, match="outside"):
        allocate_budgets(loss, grid, 20, 24, 1000)
    with pytest.raises(ValueError, match="grid budgets"):
        allocate_budgets(loss[:, :3], grid, 100, 24, 1000)


def test_sensitivity_curves_equal_per_plan_simulation(tiny_models):
    model = tiny_models["tiny-llama"]
    sim = Simulator(model)
    samples = [(random_ids(90, seed=31), random_ids(6, seed=32)), (random_ids(70, seed=33), random_ids(5, seed=34))]
    policies, grid = ["snapkv", "knorm"], [8, 30, 200]
    curves = sensitivity_curves(sim, samples, policies, grid, plans_per_pass=5)
    layers = model.config.num_hidden_layers
    assert curves.loss.shape == (layers, 2, 3)
    expected = torch.zeros(layers * 2 * 3, dtype=torch.float64)
    for context, probe in samples:
        plans = sweep_plans(layers, context.shape[-1], policies, grid)
        expected += sim.evaluate(context, probe, plans).kl.double() / len(samples)
    assert (curves.loss.flatten() - expected).abs().max().item() <= 1e-5
    assert curves.loss[..., 2].abs().max().item() <= 1e-6  # budget 200 > n keeps everything
    assert torch.all(curves.loss[..., 0] > 1e-6)
    plan = calibrated_plan(curves, 20, 4, 70)
    assert sum(plan.budgets) == layers * 20 and all(4 <= b <= 70 for b in plan.budgets)
