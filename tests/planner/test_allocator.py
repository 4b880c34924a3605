"""The differentiable budget allocator (design §6): exact totals, bounds, uniform start, gradients."""

from __future__ import annotations

import pytest
import torch

from polykv_learn.planner.allocator import BudgetAllocator
from polykv_learn.planner.head_allocator import HeadAllocator
from polykv_learn.planner.router import MLPRouter


def features(num_layers: int, num_features: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_layers, num_features, generator=torch.Generator().manual_seed(seed))  # (L, F)


def randomised(allocator: BudgetAllocator, seed: int = 0, scale: float = 3.0) -> BudgetAllocator:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in allocator.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return allocator


def test_untrained_is_uniform():
    for num_layers, budget in [(1, 16), (7, 128), (30, 512), (32, 100)]:
        alloc = BudgetAllocator(7)
        f = features(num_layers)
        b = alloc(f, budget, context_length=4000, b_min=4)
        torch.testing.assert_close(b, torch.full((num_layers,), float(budget)))
        assert alloc.integer_budgets(f, budget, context_length=4000, b_min=4) == [budget] * num_layers


def test_sum_bounds_and_integer_budgets():
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        num_layers = int(torch.randint(2, 36, (1,), generator=gen))
        budget = int(torch.randint(4, 600, (1,), generator=gen))
        n = budget + int(torch.randint(1, 3000, (1,), generator=gen))
        b_min = int(torch.randint(1, budget + 1, (1,), generator=gen))
        alloc = randomised(BudgetAllocator(7, hidden=16), seed)
        f = features(num_layers, seed=seed)
        b = alloc(f, budget, n, b_min).detach()
        assert b.shape == (num_layers,)
        assert abs(float(b.sum()) - num_layers * budget) <= 1e-4 * num_layers * budget
        assert float(b.min()) >= b_min - 1e-3 and float(b.max()) <= n + 1e-3
        ints = alloc.integer_budgets(f, budget, n, b_min)
        assert sum(ints) == num_layers * budget
        assert min(ints) >= b_min and max(ints) <= n
        assert all(abs(i - v) < 1 + 1e-3 for i, v in zip(ints, b.tolist(), strict=True))


def test_gradient_flows():
    alloc = randomised(BudgetAllocator(7), seed=1, scale=0.5)
    f = features(12, seed=1)
    b = alloc(f, 64, context_length=1000, b_min=4)
    loss = (b * torch.linspace(0, 1, 12)).sum()
    grads = torch.autograd.grad(loss, list(alloc.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_gradient_flows_from_zero_init():
    alloc = BudgetAllocator(7)
    b = alloc(features(6), 32, context_length=500)
    (grad,) = torch.autograd.grad((b * torch.arange(6.0)).sum(), [alloc.net[-1].weight])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_short_context_keeps_everything():
    alloc = randomised(BudgetAllocator(7), seed=2)
    f = features(5)
    torch.testing.assert_close(alloc(f, 128, context_length=100), torch.full((5,), 100.0))
    assert alloc.integer_budgets(f, 128, context_length=100) == [100] * 5


def test_errors():
    alloc = BudgetAllocator(7)
    with pytest.raises(ValueError, match=r"features must have shape \(L, 7\)"):
        alloc(torch.zeros(4, 6), 16, 100)
    with pytest.raises(ValueError, match="b_min must be an integer in"):
        alloc(features(4), 16, 100, b_min=32)
    with pytest.raises(ValueError, match="budget must be positive"):
        alloc(features(4), 0, 100)
    with pytest.raises(ValueError, match="budget must be an integer"):
        alloc.integer_budgets(features(4), 16.5, 100)


@pytest.mark.parametrize(
    "make",
    [
        lambda f, h, k: BudgetAllocator(f, hidden=h, num_hidden_layers=k),
        lambda f, h, k: HeadAllocator(f, hidden=h, num_hidden_layers=k),
        lambda f, h, k: MLPRouter(f, ["snapkv", "streaming"], hidden=h, num_hidden_layers=k),
    ],
    ids=["allocator", "head_allocator", "router"],
)
@pytest.mark.parametrize("sizes", [(0, 8, 1), (4, 0, 1), (4, 8, -1)])
def test_the_planner_mlps_refuse_bad_sizes_in_one_line(make, sizes):
    """Router, allocator and head allocator build their MLPs with one function, which checks the sizes."""
    with pytest.raises(ValueError, match="need num_features >= 1, hidden >= 1, num_hidden_layers >= 0; got ") as err:
        make(*sizes)
    assert "\n" not in str(err.value) and str(err.value).endswith(", ".join(map(str, sizes)))


def test_the_planner_mlps_keep_their_layout():
    """The router's state dict keys are unchanged by sharing the MLP builder (artifacts keep loading)."""
    router = MLPRouter(5, ["snapkv", "streaming"], hidden=8, num_hidden_layers=2)
    assert list(router.state_dict()) == [f"net.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]
    assert router(torch.zeros(3, 5)).shape == (3, 2)
