"""Calibration: sweep losses equal the simulator's per-plan KL; budget allocation is exact, bounded and optimal."""

import itertools

import pytest
import torch
from model_helpers import random_ids

from polykv_learn.calibrate import (
    allocate_budgets,
    calibrated_plan,
    full_layer_plans,
    prefill_samples,
    refine_plan,
    sensitivity_curves,
    sweep_plans,
    uniform_losses,
)
from polykv_learn.plan import Plan
from polykv_learn.simulator import Simulator, kl_to_full


def probe_kl(sim, context, probe, plans):
    """Reference loss: KL(full || plan) per probe token, token 0 (predicted by the context alone: KL 0) included."""
    result = sim.evaluate(context, probe, plans)
    m = probe.shape[-1]
    return kl_to_full(result.full_logits[: m - 1], result.logits[:, : m - 1]).double() * (m - 1) / m


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
        expected += probe_kl(sim, context, probe, plans) / len(samples)
    assert (curves.loss.flatten() - expected).abs().max().item() <= 1e-5
    assert curves.loss[..., 2].abs().max().item() <= 1e-6  # budget 200 > n keeps everything
    assert torch.all(curves.loss[..., 0] > 1e-6)
    plan = calibrated_plan(curves, 20, 4, 70)
    assert sum(plan.budgets) == layers * 20 and all(4 <= b <= 70 for b in plan.budgets)


def test_uniform_baseline_curves_equal_per_plan_simulation(tiny_models):
    model = tiny_models["tiny-llama"]
    sim = Simulator(model)
    samples = [(random_ids(80, seed=41), random_ids(6, seed=42)), (random_ids(64, seed=43), random_ids(4, seed=44))]
    policies, grid = ["snapkv", "knorm"], [8, 30]
    layers = model.config.num_hidden_layers
    base = Plan.uniform("snapkv", 16, layers)
    calib = prefill_samples(sim, samples, policies, plans_per_pass=7)
    curves = sensitivity_curves(sim, calib, policies, grid, base=base)
    expected = torch.zeros(layers * 2 * 2, dtype=torch.float64)
    expected_full = torch.zeros(layers, dtype=torch.float64)
    for context, probe in samples:
        n = context.shape[-1]
        expected += probe_kl(sim, context, probe, sweep_plans(layers, n, policies, grid, base)) / len(samples)
        expected_full += probe_kl(sim, context, probe, full_layer_plans(layers, n, base)) / len(samples)
    assert (curves.loss.flatten() - expected).abs().max().item() <= 1e-5
    assert (curves.full_loss - expected_full).abs().max().item() <= 1e-5
    # the base itself: layer l at (snapkv, 16) is the uniform plan, whatever l
    uniform = uniform_losses(calib, policies, 16)["snapkv"]
    assert curves.full_loss.max().item() <= uniform + 1e-6
    plan = calibrated_plan(curves, 20, 4, 64)
    assert sum(plan.budgets) == layers * 20 and all(4 <= b <= 64 for b in plan.budgets)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_with_measured_whole_layer_cost_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    layers, n, b_min = 3, 6, 1
    grid = list(range(1, n))
    scale = torch.rand(layers, 1, generator=gen) + 0.1
    whole = torch.rand(layers, generator=gen) * 0.5  # c_l(n) > 0: a uniform base, not the full cache
    loss = whole[:, None] + scale * (n - torch.tensor(grid, dtype=torch.float64))[None, :] ** 2

    def cost(budgets):
        return sum(float(whole[i]) if b == n else float(loss[i, grid.index(b)]) for i, b in enumerate(budgets))

    for average in range(b_min, n + 1):
        budgets = allocate_budgets(loss, grid, average, b_min, n, full_loss=whole)
        assert sum(budgets) == layers * average and all(b_min <= b <= n for b in budgets)
        combos = [c for c in itertools.product(range(b_min, n + 1), repeat=layers) if sum(c) == layers * average]
        assert cost(budgets) == pytest.approx(min(cost(list(c)) for c in combos), abs=1e-9)
    with pytest.raises(ValueError, match="full_loss must have one value per layer"):
        allocate_budgets(loss, grid, 3, b_min, n, full_loss=whole[:2])


def test_refinement_is_exact_and_never_worse_than_its_best_start(tiny_models):
    model = tiny_models["tiny-llama"]
    sim = Simulator(model)
    samples = [(random_ids(72, seed=51), random_ids(5, seed=52)), (random_ids(66, seed=53), random_ids(5, seed=54))]
    policies = ["snapkv", "knorm", "streaming"]
    layers = model.config.num_hidden_layers
    calib = prefill_samples(sim, samples, policies)
    starts = [Plan.uniform(p, 12, layers) for p in policies]
    refined = refine_plan(calib, starts, 12, policies, b_min=4, rounds=2)
    start_losses = calib.mean_loss(starts)
    assert (
        refined.start_loss == min(start_losses) and refined.start_plan == starts[start_losses.index(min(start_losses))]
    )
    assert refined.loss <= refined.start_loss
    assert len(refined.moves) <= 2 and (refined.loss < refined.start_loss) == bool(refined.moves)
    assert sum(refined.plan.budgets) == layers * 12 and all(4 <= b <= 66 for b in refined.plan.budgets)
    assert calib.mean_loss([refined.plan])[0] == pytest.approx(refined.loss, abs=1e-12)
    # the mean loss is the mean of each sample's reference KL
    reference = sum(probe_kl(sim, c, p, [refined.plan])[0].item() for c, p in samples) / 2
    assert refined.loss == pytest.approx(reference, abs=1e-5)
    with pytest.raises(ValueError, match="rounds must be an integer >= 0"):
        refine_plan(calib, starts, 12, policies, rounds=-1)
    with pytest.raises(ValueError, match="at least one start plan"):
        refine_plan(calib, [], 12, policies)
