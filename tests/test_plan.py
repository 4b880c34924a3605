"""Plan validation, constructors and the exact-sum budget arithmetic (design §2, §6)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from polykv_learn.plan import Plan, project_budgets, round_preserving_sum


def _random_combos(count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        yield (
            rng.randint(1, 48),
            rng.choice([1, 2, 3, 7, 16, 64, 128, 512, 1000]),
            rng.choice([1, 1.5, 2, 8, 20, 50]),
        )


# ---------------------------------------------------------------- round_preserving_sum
def test_round_preserving_sum_exact_and_close():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        num_layers = int(torch.randint(1, 40, (1,), generator=gen))
        total = int(torch.randint(num_layers, 50 * num_layers, (1,), generator=gen))
        weights = torch.rand(num_layers, generator=gen, dtype=torch.float64) + 0.05
        values = weights / weights.sum() * total
        out = round_preserving_sum(values, total, lower=0)
        assert sum(out) == total, trial
        assert all(isinstance(b, int) for b in out)
        assert all(abs(b - v) < 1 for b, v in zip(out, values.tolist(), strict=True)), (out, values)


def test_round_preserving_sum_bounds_and_order():
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        num_layers = int(torch.randint(2, 30, (1,), generator=gen))
        lower, upper = 3, 40
        total = int(torch.randint(num_layers * lower, num_layers * upper + 1, (1,), generator=gen))
        values = torch.rand(num_layers, generator=gen, dtype=torch.float64) ** 3 * 100
        out = round_preserving_sum(values, total, lower=lower, upper=upper)
        assert sum(out) == total
        assert min(out) >= lower and max(out) <= upper
        order = values.argsort().tolist()  # ascending values give non-decreasing integers
        assert all(out[i] <= out[j] for i, j in zip(order, order[1:], strict=False))


def test_round_preserving_sum_integers_unchanged():
    assert round_preserving_sum([5, 7, 9], 21) == [5, 7, 9]
    assert round_preserving_sum([2.5, 2.5], 5) == [3, 2]  # ties go to the earlier layer


def test_round_preserving_sum_infeasible():
    with pytest.raises(ValueError, match="below 3 layers x lower bound 4"):
        round_preserving_sum([1.0, 1.0, 1.0], 10, lower=4)
    with pytest.raises(ValueError, match="above 3 layers x upper bound 2"):
        round_preserving_sum([1.0, 1.0, 1.0], 10, lower=1, upper=2)
    with pytest.raises(ValueError, match="non-negative"):
        round_preserving_sum([1.0, -1.0], 10)
    with pytest.raises(ValueError, match="at least one layer"):
        round_preserving_sum([], 0)


# ---------------------------------------------------------------- project_budgets
def test_project_budgets_sum_and_bounds():
    gen = torch.Generator().manual_seed(2)
    for _ in range(300):
        num_layers = int(torch.randint(1, 40, (1,), generator=gen))
        lower = float(torch.randint(0, 5, (1,), generator=gen))
        upper = lower + float(torch.randint(1, 200, (1,), generator=gen))
        total = lower * num_layers + float(torch.rand(1, generator=gen)) * (upper - lower) * num_layers
        weights = torch.softmax(torch.randn(num_layers, generator=gen) * 3, dim=0)
        out = project_budgets(weights, total, lower, upper)
        assert out.shape == (num_layers,)
        assert abs(float(out.sum()) - total) <= 1e-4 * max(1.0, total)
        assert float(out.min()) >= lower - 1e-4 and float(out.max()) <= upper + 1e-4


def test_project_budgets_is_clip_of_scaled_weights():
    weights = torch.tensor([10.0, 1.0, 1.0, 0.1], dtype=torch.float64)
    out = project_budgets(weights, total=40.0, lower=2.0, upper=20.0)
    # layer 0 clamps at 20, layer 3 at 2; the other two share 18 in proportion 1:1
    assert torch.allclose(out, torch.tensor([20.0, 9.0, 9.0, 2.0], dtype=torch.float64))


def test_project_budgets_no_clamping_is_proportional():
    weights = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(project_budgets(weights, 60.0, 1.0, 100.0), torch.tensor([10.0, 20.0, 30.0]))


def test_project_budgets_gradient_flows():
    z = torch.randn(12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    total = 12 * 64.0
    b = project_budgets(total * torch.softmax(z * 2, dim=0), total, lower=8.0, upper=200.0)
    loss = (b * torch.linspace(-1, 1, 12)).sum()
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_project_budgets_zero_weights_and_errors():
    out = project_budgets(torch.tensor([1.0, 0.0, 0.0]), total=30.0, lower=1.0, upper=12.0)
    assert torch.allclose(out, torch.tensor([12.0, 9.0, 9.0]))
    with pytest.raises(ValueError, match="infeasible"):
        project_budgets(torch.ones(3), total=3.0, lower=2.0, upper=5.0)
    with pytest.raises(ValueError, match="all zero"):
        project_budgets(torch.zeros(3), total=3.0, lower=0.0, upper=5.0)
    with pytest.raises(ValueError, match="1-D"):
        project_budgets(torch.ones(2, 2), total=4.0, lower=0.0, upper=5.0)


# ---------------------------------------------------------------- Plan
def test_uniform():
    for num_layers, budget, _ in _random_combos(50):
        plan = Plan.uniform("snapkv", budget, num_layers)
        assert plan.budgets == (budget,) * num_layers
        assert plan.total_budget == num_layers * budget and plan.average_budget == budget
        assert plan.num_layers == num_layers and plan.policies == ("snapkv",) * num_layers


def test_pyramid_invariants():
    for num_layers, budget, beta in _random_combos(400, seed=4):
        plan = Plan.pyramid("streaming", budget, num_layers, beta=beta)
        b = plan.budgets
        assert sum(b) == num_layers * budget and plan.average_budget == budget
        assert min(b) >= 1
        assert all(x >= y for x, y in zip(b, b[1:], strict=False)), b


def test_pyramid_follows_the_linear_schedule():
    plan = Plan.pyramid("snapkv", 512, 8, beta=20)
    ideal = [2 * 512 - 512 / 20 - (2 * 512 - 2 * 512 / 20) * l / 7 for l in range(8)]
    assert all(abs(b - v) < 1 for b, v in zip(plan.budgets, ideal, strict=True))
    assert plan.budgets[-1] in (25, 26) and plan.budgets[0] in (998, 999)
    assert Plan.pyramid("snapkv", 64, 1).budgets == (64,)
    assert Plan.pyramid("snapkv", 64, 4, beta=1).budgets == (64,) * 4


def test_from_allocation_invariants():
    rng = random.Random(5)
    for num_layers, budget, _ in _random_combos(300, seed=6):
        weights = [rng.random() ** 2 for _ in range(num_layers)]
        weights[0] += 0.01
        b_min = rng.randint(1, budget)
        b_max = rng.choice([None, budget + rng.randint(0, 3 * budget)])
        plan = Plan.from_allocation("knorm", weights, budget, b_min=b_min, b_max=b_max)
        assert plan.total_budget == num_layers * budget
        assert min(plan.budgets) >= b_min
        assert b_max is None or max(plan.budgets) <= b_max


def test_from_allocation_proportional():
    plan = Plan.from_allocation(["snapkv", "tova", "knorm"], [1, 2, 3], 20)
    assert plan.budgets == (10, 20, 30) and plan.policies == ("snapkv", "tova", "knorm")


def test_from_allocation_errors():
    with pytest.raises(ValueError, match="infeasible"):
        Plan.from_allocation("snapkv", [1, 2], 10, b_max=8)
    with pytest.raises(ValueError, match="all zero"):
        Plan.from_allocation("snapkv", [0, 0], 10)
    with pytest.raises(ValueError, match="non-negative"):
        Plan.from_allocation("snapkv", [1, -2], 10)
    with pytest.raises(ValueError, match="got 1 policies for 2 layers"):
        Plan.from_allocation(["snapkv"], [1, 2], 10)


def test_cake():
    rng = random.Random(7)
    for num_layers, budget, _ in _random_combos(100, seed=8):
        ent = [rng.random() + 0.1 for _ in range(num_layers)]
        var = [rng.random() + 0.1 for _ in range(num_layers)]
        a, b = rng.choice([0.5, 1.0, 2.0]), rng.choice([0.5, 1.0, 2.0])
        plan = Plan.cake("snapkv", budget, ent, var, a=a, b=b)
        assert plan.total_budget == num_layers * budget and min(plan.budgets) >= 1
        pref = [e**a * v**b for e, v in zip(ent, var, strict=True)]
        i, j = max(range(num_layers), key=pref.__getitem__), min(range(num_layers), key=pref.__getitem__)
        assert plan.budgets[i] >= plan.budgets[j]
    plan = Plan.cake("snapkv", 10, [1.0, 1.0, 2.0], [1.0, 3.0, 1.0], a=1.0, b=1.0)
    assert plan.budgets == (5, 15, 10)


def test_validation_errors():
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; known policies: .*snapkv.*streaming"):
        Plan(("nope",), (4,))
    with pytest.raises(ValueError, match="budget of layer 1 must be a positive integer.*got 0"):
        Plan(("snapkv", "snapkv"), (4, 0))
    with pytest.raises(ValueError, match="budget of layer 0 must be a positive integer.*got -3"):
        Plan.uniform("snapkv", -3, 2)
    with pytest.raises(ValueError, match="budget of layer 0 must be a positive integer, got 2.5"):
        Plan(("snapkv",), (2.5,))
    with pytest.raises(ValueError, match="2 policies but 3 budgets"):
        Plan(("snapkv", "tova"), (1, 2, 3))
    with pytest.raises(ValueError, match="at least one layer"):
        Plan((), ())
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        Plan.uniform("snapkv", 4, 0)
    with pytest.raises(ValueError, match="beta must be >= 1"):
        Plan.pyramid("snapkv", 4, 3, beta=0.5)


def test_round_trip_and_helpers():
    plan = Plan.from_lists(["snapkv", "streaming", "tova"], [100, 20, 60])
    assert isinstance(plan.policies, tuple) and isinstance(plan.budgets, tuple)
    data = json.loads(json.dumps(plan.to_dict()))
    assert Plan.from_dict(data) == plan
    with pytest.raises(ValueError, match="lacks"):
        Plan.from_dict({"policies": ["snapkv"]})
    plan.check_num_layers(3)
    with pytest.raises(ValueError, match="plan has 3 layers but the model has 4"):
        plan.check_num_layers(4)
    assert plan.effective_budgets(50) == [50, 20, 50]
    assert plan.effective_budgets(1000) == [100, 20, 60]
    text = str(plan)
    assert "3 layers" in text and "total budget 180" in text and "streaming" in text
    assert len(text.splitlines()) == 2 + 3
    assert list(plan) == [("snapkv", 100), ("streaming", 20), ("tova", 60)]
    assert math.isclose(plan.average_budget, 60.0)


def test_pyramid_with_a_context_is_capped_exactly_and_keeps_all_of_a_short_one():
    plan = Plan.pyramid("snapkv", 512, 8, context_length=600)  # the bottom layers would want ~1000
    assert plan.total_budget == 8 * 512 and max(plan.budgets) <= 600
    assert list(plan.budgets) == sorted(plan.budgets, reverse=True)
    assert Plan.pyramid("snapkv", 512, 8, context_length=4096) == Plan.pyramid("snapkv", 512, 8)
    assert Plan.pyramid("snapkv", 512, 8, context_length=300) == Plan.uniform("snapkv", 512, 8)
