"""KVzip's own allocation in a deployed cache (``layerwise.kvzip_global_planner``): after the reconstruction pass,
every row gets the plan the evaluation's ``kvzip-global-heads`` (or ``kvzip-global``) gives its own statistics,
each KV head physically holds its share, and greedy generation equals a cache given that plan outright."""

import pytest
import torch
from adaptive_helpers import left_padded, prefill
from model_helpers import random_ids

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache, cache_bytes, row_stats
from polykv_learn.capture import CaptureOptions
from polykv_learn.deploy import make_cache
from polykv_learn.eval.methods import MethodInput, available_methods
from polykv_learn.layerwise import kvzip_global_planner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("heads", "method"), [(True, "kvzip-global-heads"), (False, "kvzip-global")])
def test_every_row_gets_the_evaluations_plan_of_its_own_statistics(tiny_models, heads, method):
    model = tiny_models["tiny-llama"]
    ids, mask = left_padded()
    capture = CompressedCache(model, capture=CaptureOptions(reconstruct=True))
    prefill(model, capture, ids, mask)
    stats = capture.layer_stats
    cache = make_cache(model, planner=kvzip_global_planner(24, heads=heads))
    prefill(model, cache, ids, mask)
    table = available_methods()
    rows = range(ids.shape[0])
    expected = [table[method].plan(MethodInput([row_stats(s, r) for s in stats]), 24) for r in rows]
    assert cache.applied_plans == expected
    assert all(p.total_budget == 4 * 24 and set(p.policies) == {"kvzip"} for p in expected)
    assert all((p.head_budgets is not None) == heads for p in expected)
    if heads:
        assert any(len(set(h)) > 1 for p in expected for h in p.head_budgets), "KVzip's split is uneven somewhere"


def test_greedy_generation_equals_the_plan_given_outright_and_holds_only_the_kept_positions(tiny_models):
    model = tiny_models["tiny-llama"]
    dims = adapter.model_dims(model)
    ids = random_ids(120, seed=7)
    cache = make_cache(model, planner=kvzip_global_planner(16))
    out = model.generate(ids, max_new_tokens=12, do_sample=False, cache=cache)
    plan = cache.applied_plan
    assert plan.head_budgets is not None and plan.total_budget == 4 * 16
    fixed = CompressedCache(model, plan=plan)  # static: the reconstruction pass runs, then every layer evicts
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, cache=fixed), out)
    check = make_cache(model, planner=kvzip_global_planner(16))
    with torch.no_grad():
        adapter.forward(model, ids, check, logits_to_keep=1)
    kept = sum(sum(h) for h in plan.head_budgets)
    itemsize = next(model.parameters()).element_size()
    assert cache_bytes(check) == kept * dims.head_dim * 2 * itemsize  # ragged: no head padded to another


def test_a_bad_budget_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^budget must be a positive integer, got 0$"):
        kvzip_global_planner(0)
