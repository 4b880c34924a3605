"""The shipped head-wise SmolLM2 router (``checkpoints/smollm2-135m-heads``, fitted with ``model.head_allocation:
learned``): it loads, plans SmolLM2 with the exact layer total and per-layer head totals, its learned split is not
the even one, the deployed ragged cache holds exactly the kept positions, and greedy generation through it equals
greedy decoding on the simulator for the same plan."""

import pytest
import torch
from greedy_helpers import assert_same_greedy, greedy_generate, simulator_greedy

from polykv_learn import adapter
from polykv_learn.cache import cache_bytes, padding_bytes
from polykv_learn.deploy import compress
from polykv_learn.deploy.polykv import PolyKV

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROUTER = "checkpoints/smollm2-135m-heads"
BUDGET = 48


def prompt_ids(tokenizer):
    text = " ".join(
        f"Item {i} is stored in box {(i * 7) % 101}, next to a {('red', 'blue')[i % 2]} lamp." for i in range(80)
    )
    return tokenizer(text + " To sum up, the item in box 14 is item", return_tensors="pt").input_ids[:, -320:]


def test_the_shipped_heads_router_plans_exact_head_totals_and_deploys_as_the_simulator(smollm2):
    model, tokenizer = smollm2
    polykv = PolyKV.from_pretrained(ROUTER)
    assert polykv.head_allocation == "learned"
    dims = adapter.model_dims(model)
    prompt = prompt_ids(tokenizer)
    n = prompt.shape[1]
    plan = polykv.plan_for(model, prompt[0], BUDGET, head_allocation="learned")
    assert sum(plan.budgets) == dims.num_layers * BUDGET
    assert plan.head_budgets is not None
    for layer, heads in enumerate(plan.head_budgets):
        assert len(heads) == dims.num_kv_heads and sum(heads) == dims.num_kv_heads * plan.budgets[layer]
        assert all(0 <= b <= n for b in heads)
    assert any(len(set(heads)) > 1 for heads in plan.head_budgets), "the learned split is the even one"
    # the deployed cache after prefill: every KV head holds exactly its kept positions (batch 1: no padding)
    cache = polykv.make_cache(model, BUDGET, head_allocation="learned")
    with torch.no_grad():
        adapter.forward(model, prompt, cache)
    assert cache.applied_plan == plan
    kept = sum(min(b, n) for heads in plan.head_budgets for b in heads)
    itemsize = next(model.parameters()).element_size()
    assert cache_bytes(cache) == kept * dims.head_dim * 2 * itemsize
    assert padding_bytes(cache) == 0
    # generate through the router's own adaptive cache == the simulator under the plan it applies
    with compress(model, cache_factory=lambda: polykv.make_cache(model, BUDGET, head_allocation="learned")):
        generated = greedy_generate(model, prompt)
    assert_same_greedy(generated, simulator_greedy(model, prompt, plan, capture=polykv.capture))
