"""The learned head allocator (issue #17): exact per-layer totals and bounds, an even split when untrained, the
projection against a brute-force bisection, gradients into the logits and the layer budgets, soft == hard in the
limit, and the planner's head plans and their round trip through ``state``/``from_state``."""

from __future__ import annotations

import math

import pytest
import torch

from polykv_learn.features import FeatureScaler
from polykv_learn.head_features import HEAD_FEATURE_NAMES
from polykv_learn.learn.soft_plan import soft_keep_weights
from polykv_learn.planner import BudgetAllocator, HeadAllocator, LearnedPlanner, MLPRouter

FH = len(HEAD_FEATURE_NAMES)


def head_feats(num_layers: int, g: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_layers, g, FH, generator=torch.Generator().manual_seed(seed))  # (L, G, Fh)


def randomised(module: torch.nn.Module, seed: int = 0, scale: float = 2.0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


def test_untrained_splits_every_layer_evenly():
    alloc = HeadAllocator(FH)
    f = head_feats(5, 4)
    layer = torch.tensor([10.0, 33.5, 64.0, 2.0, 100.0])
    torch.testing.assert_close(alloc(f, layer, 100, b_min=4), layer[:, None].expand(5, 4))
    assert alloc.integer_budgets(f, [10, 33, 64, 2, 100], 100, b_min=4) == [(b,) * 4 for b in (10, 33, 64, 2, 100)]


def test_exact_layer_totals_and_bounds():
    for seed in range(25):
        gen = torch.Generator().manual_seed(seed)
        num_layers, g = int(torch.randint(1, 8, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
        n = int(torch.randint(20, 400, (1,), generator=gen))
        b_min = int(torch.randint(1, 10, (1,), generator=gen))
        ints = torch.randint(1, n + 1, (num_layers,), generator=gen).tolist()
        alloc = randomised(HeadAllocator(FH, hidden=8), seed, scale=3.0)
        f = head_feats(num_layers, g, seed)
        real = alloc(f, torch.tensor(ints, dtype=torch.float32), n, b_min).detach()  # (L, G)
        heads = alloc.integer_budgets(f, ints, n, b_min)
        for layer, b in enumerate(ints):
            lower = min(b_min, b)
            assert abs(float(real[layer].sum()) - g * b) <= 1e-3 * g * b
            assert float(real[layer].min()) >= lower - 1e-4 and float(real[layer].max()) <= n + 1e-4
            assert sum(heads[layer]) == g * b and min(heads[layer]) >= lower and max(heads[layer]) <= n
            if b < n:  # rounding moves every head by less than one position
                assert all(abs(i - v) < 1 + 1e-6 for i, v in zip(heads[layer], real[layer].tolist(), strict=True))


def naive_split(z: list[float], b: float, n: int, b_min: int) -> list[float]:
    """Brute force: bisection on c of sum_h clip(c * softmax(z)_h, lower, n) = G * b."""
    w = [math.exp(v - max(z)) for v in z]
    w = [v / sum(w) for v in w]
    lower, total = min(b_min, b), len(z) * b
    lo, hi = 0.0, 1e9
    for _ in range(200):
        c = (lo + hi) / 2
        if sum(min(max(c * v, lower), n) for v in w) < total:
            lo = c
        else:
            hi = c
    return [min(max(hi * v, lower), n) for v in w]


def naive_round(real: list[float], total: int) -> list[int]:
    """Largest remainder: floors, then one more to the largest fractional parts (ties to the earlier head)."""
    base = [math.floor(v) for v in real]
    order = sorted(range(len(real)), key=lambda i: (-(real[i] - base[i]), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


def test_equals_a_naive_computation_on_a_small_case():
    alloc = randomised(HeadAllocator(FH, hidden=4), seed=3, scale=1.5)
    f = head_feats(3, 4, seed=3)
    budgets, n, b_min = [7, 20, 40], 48, 2
    z = alloc.logits(f).detach().double()  # (3, 4)
    real = alloc(f, torch.tensor(budgets, dtype=torch.float64), n, b_min).detach()
    heads = alloc.integer_budgets(f, budgets, n, b_min)
    for layer, b in enumerate(budgets):
        expected = naive_split(z[layer].tolist(), float(b), n, b_min)
        assert real[layer].tolist() == pytest.approx(expected, abs=1e-4)  # float32 logits
        assert list(heads[layer]) == naive_round(expected, 4 * b)
    assert any(len(set(h)) > 1 for h in heads)  # the case is not the even split


def test_gradients_reach_the_logits_and_the_layer_budget():
    alloc = randomised(HeadAllocator(FH, hidden=8), seed=1, scale=0.5)
    f = head_feats(4, 3, seed=1)
    layer = torch.tensor([30.0, 40.0, 50.0, 60.0], requires_grad=True)
    out = alloc(f, layer, 500, b_min=2)  # (4, 3), no head at a bound
    weights = torch.arange(12, dtype=out.dtype).reshape(4, 3)
    grads = torch.autograd.grad((out * weights).sum(), [layer, *alloc.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads[1:]) > 0
    # the sum of a layer's heads is G * b_l exactly, so its derivative in b_l is G
    (d_layer,) = torch.autograd.grad(alloc(f, layer, 500, b_min=2).sum(), [layer])
    torch.testing.assert_close(d_layer, torch.full((4,), 3.0))


def test_soft_head_budgets_match_the_hard_ones_in_the_limit():
    """With integer layer budgets, the soft keep weights of the real head budgets at tau -> 0 are the hard keep
    masks of the rounded ones wherever the two agree, and the real and rounded budgets differ by < 1 per head."""
    alloc = randomised(HeadAllocator(FH, hidden=8), seed=2, scale=1.0)
    f = head_feats(2, 4, seed=2)
    n, budgets = 64, [16, 24]
    real = alloc(f, torch.tensor(budgets, dtype=torch.float64), n, b_min=1).detach()  # (2, G)
    heads = alloc.integer_budgets(f, budgets, n, b_min=1)
    ranks = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(h)) for h in range(4)])[None]
    for layer in range(2):
        hard = torch.tensor(heads[layer], dtype=torch.float64)
        assert (real[layer] - hard).abs().max() < 1
        soft = soft_keep_weights(ranks, hard[None], tau=1e-4)[0, 0]  # (G, n) with the integer budgets
        mask = ranks[0] < hard[:, None]
        torch.testing.assert_close(soft, mask.double(), atol=1e-6, rtol=0)
        # the soft weights of the real budgets sum to the real budgets (each head within 1/2 of its keep count)
        soft_real = soft_keep_weights(ranks, real[layer][None], tau=1e-4)[0, 0]  # (G, n)
        assert ((soft_real.sum(-1) - real[layer]).abs() <= 0.5 + 1e-6).all()


def make_planner(seed: int = 0, heads: bool = True) -> LearnedPlanner:
    gen = torch.Generator().manual_seed(seed)
    router = randomised(MLPRouter(7, ["snapkv", "tova"], hidden=8), seed)
    allocator = randomised(BudgetAllocator(7, hidden=8), seed + 1, scale=1.0)
    scaler = FeatureScaler(mean=torch.randn(7, generator=gen), std=torch.rand(7, generator=gen) + 0.5)
    head_alloc = head_scaler = None
    if heads:
        head_alloc = randomised(HeadAllocator(FH, hidden=8), seed + 2, scale=1.0)
        head_scaler = FeatureScaler(mean=torch.randn(FH, generator=gen), std=torch.rand(FH, generator=gen) + 0.5)
    return LearnedPlanner(["snapkv", "tova"], scaler, router, allocator, 2, None, head_alloc, head_scaler)


def test_planner_head_plans_keep_exact_totals_and_round_trip():
    planner = make_planner()
    feats, hfeats = torch.randn(6, 7), head_feats(6, 3, seed=5)
    plan = planner.plan(feats, 32, 300, head_features=hfeats)
    assert plan.total_budget == 6 * 32 and plan.head_budgets is not None
    for b, h in zip(plan.budgets, plan.head_budgets, strict=True):
        assert sum(h) == 3 * b and min(h) >= 2 and max(h) <= 300
    assert any(len(set(h)) > 1 for h in plan.head_budgets)
    config, tensors = planner.state("mlp")
    assert config["head_allocation"] == "learned" and config["head_allocator"]["feature_names"] == HEAD_FEATURE_NAMES
    config = {**config, "feature_names": [f"f{i}" for i in range(7)]}
    again = LearnedPlanner.from_state(config, tensors)
    assert again.plan(feats, 32, 300, head_features=hfeats) == plan
    assert planner.plan(feats, 400, 300, head_features=hfeats).head_budgets is None  # n <= B keeps everything
    assert planner.plan(feats, 32, 300) == plan.with_head_budgets(None)  # no head signals: every head keeps b_l
    with pytest.raises(ValueError, match=r"^this planner has no head allocator: plan takes no per-head features$"):
        make_planner(heads=False).plan(feats, 32, 300, head_features=hfeats)


def test_without_a_head_allocator_state_is_unchanged():
    planner = make_planner(heads=False)
    config, tensors = planner.state("mlp")
    assert not any(k.startswith("head") for k in config) and not any(k.startswith("head") for k in tensors)
    assert planner.plan(torch.randn(6, 7), 32, 300).head_budgets is None
