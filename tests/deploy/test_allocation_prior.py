"""The ``kvzip_global`` allocation prior: a layer column computed across layers from KVzip's scores, which an
allocator with gain 1 follows exactly (KVzip's global allocation), carried by the artifact, computed the same in the
prefill store, the deployed adaptive cache and ``plans_for_stats``."""

import pytest
import torch
from adaptive_helpers import left_padded, prefill
from artifact_helpers import make_artifact
from policy_helpers import random_layer_stats

from polykv_learn.cache import CompressedCache
from polykv_learn.deploy.artifact import read_artifact, write_artifact
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.features import feature_names
from polykv_learn.kvzip_global import global_counts, global_layer_budgets, normalised_scores, prior_column
from polykv_learn.plan import project_budgets
from polykv_learn.planner.allocator import BudgetAllocator
from polykv_learn.rows import row_stats


def layers(num_layers=5, n=60, seed=0):
    return [random_layer_stats(batch=1, pad=0, n=n, seed=seed + i, layer_idx=i) for i in range(num_layers)]


@pytest.mark.parametrize("budget", [2, 7, 20])
def test_the_column_is_the_log_of_kvzip_global_layer_budgets(budget):
    stats = layers()
    scores = [normalised_scores(s) for s in stats]
    column = prior_column(scores, budget).double()
    per_head = global_counts(scores, budget) / stats[0].num_kv_heads
    torch.testing.assert_close(column.exp() * (budget + 1) - 1, per_head, rtol=1e-6, atol=1e-5)
    assert per_head.sum() == pytest.approx(5 * budget)  # the global top-k holds L * G * B pairs
    assert sum(global_layer_budgets(stats, budget)) == 5 * budget
    assert torch.equal(prior_column(scores, 60), torch.zeros(5))  # n <= B: every layer whole, log((n+1)/(n+1))


def test_an_allocator_with_gain_one_follows_the_prior_whatever_the_scaling():
    """Budgets are L*B*softmax(z) projected: with a zero MLP and gain 1, z = std * scaled = raw - mean, so the
    budgets are L*B*softmax(raw column) projected, for any feature mean and std."""
    stats = layers()
    budget, n = 7, 60
    raw_column = prior_column([normalised_scores(s) for s in stats], budget)  # (L,)
    raw = torch.cat([torch.randn(5, 3), raw_column[:, None]], dim=1)  # (L, F): the prior is column 3
    mean, std = torch.tensor([0.1, -2.0, 3.0, -1.7]), torch.tensor([1.0, 0.5, 2.0, 0.37])
    alloc = BudgetAllocator(4, hidden=8, prior=3)
    alloc.set_prior_scale(float(std[3]))
    got = alloc((raw - mean) / std, budget, n, b_min=1)
    weights = 5 * budget * torch.softmax(raw_column.double(), dim=0)
    torch.testing.assert_close(
        got.double(), project_budgets(weights, 5.0 * budget, lower=1, upper=n), rtol=1e-5, atol=1e-4
    )
    assert sum(alloc.integer_budgets((raw - mean) / std, budget, n, 1)) == 5 * budget
    with pytest.raises(ValueError, match="prior must be a feature column in"):
        BudgetAllocator(4, prior=4)
    with pytest.raises(ValueError, match="standard deviation must be positive"):
        alloc.set_prior_scale(0.0)
    alloc.prior_gain.data.fill_(0.0)  # gain 0: the uniform start of an allocator without prior
    torch.testing.assert_close(alloc((raw - mean) / std, budget, n, 1), torch.full((5,), 7.0))


@pytest.fixture()
def prior_router(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    path = make_artifact(tmp_path / "prior", model, policies=("snapkv", "kvzip", "streaming"),
                         allocation_prior="kvzip_global")  # fmt: skip
    config, tensors = read_artifact(path)
    with torch.no_grad():  # a router that routes by the prior too: different layers, different policies
        tensors["router.net.0.weight"].normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    config = {k: v for k, v in config.items() if k != "format"}
    return model, PolyKV.from_pretrained(write_artifact(path, config, tensors))


def test_the_deployed_cache_plans_each_row_as_plans_for_stats(prior_router):
    model, polykv = prior_router
    assert polykv.allocation_prior == "kvzip_global" and polykv.capture.reconstruct
    assert polykv.feature_names == feature_names(["snapkv", "streaming"], "kvzip_global")
    ids, mask = left_padded()
    cache = polykv.make_cache(model, budget=24)
    prefill(model, cache, ids, mask)
    capture = CompressedCache(model, capture=polykv.capture)
    prefill(model, capture, ids, mask)
    expected = polykv.plans_for_stats(capture.layer_stats, 24)
    assert cache.applied_plans == expected
    for r, plan in enumerate(expected):
        one = [row_stats(s, r) for s in capture.layer_stats]
        column = polykv.features(one, 24)[:, -1]  # (L,)
        assert sum(plan.budgets) == len(plan.budgets) * 24
        # the allocator (zero MLP, gain 1) follows the prior: a layer with a larger column never gets less
        order = column.argsort(descending=True).tolist()
        assert all(plan.budgets[a] >= plan.budgets[b] for a, b in zip(order, order[1:], strict=False))
        assert len(set(plan.budgets)) > 1 and len(set(column.tolist())) > 1  # not the uniform split
    with pytest.raises(ValueError, match="cannot plan layer by layer"):
        polykv.layerwise_planner(24)


def test_the_artifact_refuses_a_prior_that_does_not_match(prior_router, tmp_path):
    _, polykv = prior_router
    config = {k: v for k, v in polykv.config.items() if k != "format"}
    bad = {**config, "allocator": {**config["allocator"], "prior": 0}}
    with pytest.raises(ValueError, match=r"allocator.prior must be \d+ \(the allocation prior's feature column\)"):
        PolyKV.from_pretrained(write_artifact(tmp_path / "bad1", bad, polykv.tensors))
    tensors = {k: v for k, v in polykv.tensors.items() if k != "allocator.prior_gain"}
    with pytest.raises(ValueError, match="tensor allocator.prior_gain is missing"):
        PolyKV.from_pretrained(write_artifact(tmp_path / "bad2", config, tensors))
    unknown = {**config, "allocation_prior": "pyramid"}
    with pytest.raises(ValueError, match="allocation_prior must be null or one of kvzip_global"):
        PolyKV.from_pretrained(write_artifact(tmp_path / "bad3", unknown, polykv.tensors))
