"""``LearnedPlanner``: exact budgets, keep-all for short contexts, and a lossless round trip through its state."""

import numpy as np
import pytest
import torch

from polykv_learn.features import FeatureScaler
from polykv_learn.planner import BudgetAllocator, GBDTRouter, LearnedPlanner, MLPRouter

POLICIES = ["streaming", "snapkv", "knorm"]
F, L = 6, 5


def make_planner(seed=0, gbdt=False, b_min=4):
    torch.manual_seed(seed)
    router = MLPRouter(F, POLICIES, hidden=8)
    allocator = BudgetAllocator(F, hidden=8)
    with torch.no_grad():
        for p in list(router.parameters()) + list(allocator.parameters()):
            p.normal_(0, 1.0)
    scaler = FeatureScaler().fit(torch.randn(40, F) * 3 + 1)
    trees = None
    if gbdt:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(60, F))
        labels = [POLICIES[int(v > 0.5) + int(v > -0.5)] for v in x[:, 0]]
        trees = GBDTRouter(max_iter=5, max_depth=2, random_state=0).fit(x, labels)
    return LearnedPlanner(POLICIES, scaler, router, allocator, b_min, trees)


@pytest.mark.parametrize("budget", [1, 3, 17, 64, 200])
def test_plans_keep_the_exact_total_within_bounds(budget):
    planner = make_planner(b_min=4)
    n = 300
    for seed in range(5):
        plan = planner.plan(torch.randn(L, F, generator=torch.Generator().manual_seed(seed)), budget, n)
        assert sum(plan.budgets) == L * budget
        assert all(min(4, budget) <= b <= n for b in plan.budgets)
        assert set(plan.policies) <= set(POLICIES)


def test_short_context_keeps_everything():
    plan = make_planner().plan(torch.randn(L, F), 128, 100)
    assert plan.budgets == (128,) * L


def test_bad_budget_and_shape_are_refused():
    planner = make_planner()
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        planner.plan(torch.randn(L, F), 0, 100)
    with pytest.raises(ValueError, match=r"plan expects features of shape \(L, F\), got \(2, 5, 6\)"):
        planner.plan(torch.randn(2, L, F), 16, 100)


@pytest.mark.parametrize("gbdt", [False, True])
def test_state_round_trip_gives_the_same_plans(gbdt):
    planner = make_planner(seed=3, gbdt=gbdt)
    config, tensors = planner.state("gbdt" if gbdt else "mlp")
    rebuilt = LearnedPlanner.from_state({**config, "feature_names": [f"f{i}" for i in range(F)]}, tensors)
    plans = set()
    for seed in range(8):
        feats = torch.randn(L, F, generator=torch.Generator().manual_seed(seed)) * 3
        for budget in (8, 40):
            plan = planner.plan(feats, budget, 256)
            assert rebuilt.plan(feats, budget, 256) == plan
            plans.add(tuple(plan.budgets))
    assert len(plans) > 2  # random weights give varied plans, so equality is not trivial


def test_gbdt_router_decides_the_policies():
    planner = make_planner(gbdt=True)
    feats = torch.randn(L, F)
    scaled = planner.scale(feats)
    assert list(planner.plan(feats, 16, 256).policies) == list(planner.gbdt.predict(scaled.numpy()))


def test_state_refuses_a_router_type_it_does_not_hold():
    with pytest.raises(ValueError, match="router type 'gbdt' does not match"):
        make_planner().state("gbdt")
