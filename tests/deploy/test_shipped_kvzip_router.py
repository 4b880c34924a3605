"""The shipped KVzip-allocation SmolLM2 router (``checkpoints/smollm2-135m-kvzip``, fitted with
``configs/smollm2-135m-kvzip-alloc.yaml``): one routed policy (kvzip), so every layer is on KVzip's scores and only
the layer allocation is learned; validated ahead of uniform kvzip at every budget; its AdaKV split keeps every
layer's and the plan's total exactly; the deployed ragged cache holds exactly the kept positions, and greedy
generation through it equals greedy decoding on the simulator for the same plan."""

import pytest
import torch
from greedy_helpers import assert_same_greedy, greedy_generate, simulator_greedy

from polykv_learn import adapter
from polykv_learn.cache import cache_bytes, padding_bytes
from polykv_learn.deploy import compress
from polykv_learn.deploy.artifact import read_artifact
from polykv_learn.deploy.polykv import PolyKV

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROUTER = "checkpoints/smollm2-135m-kvzip"
BUDGET = 48


def prompt_ids(tokenizer):
    text = " ".join(
        f"Item {i} is stored in box {(i * 7) % 101}, next to a {('red', 'blue')[i % 2]} lamp." for i in range(80)
    )
    return tokenizer(text + " To sum up, the item in box 14 is item", return_tensors="pt").input_ids[:, -320:]


def test_the_shipped_kvzip_router_plans_kvzip_everywhere_and_deploys_as_the_simulator(smollm2):
    model, tokenizer = smollm2
    polykv = PolyKV.from_pretrained(ROUTER)
    assert list(polykv.policies) == ["kvzip"] and polykv.head_allocation == "adakv"
    assert polykv.allocation_prior == "kvzip_global"
    validation = read_artifact(ROUTER)[0]["validation"]
    assert sorted(int(b) for b in validation) == [128, 256, 512, 1024]
    for row in validation.values():  # shipped only if ahead of uniform kvzip (its pool's one policy) everywhere
        assert row["learned"] < row["best_uniform"] == row["kvzip"], row
    dims = adapter.model_dims(model)
    prompt = prompt_ids(tokenizer)
    n = prompt.shape[1]
    layers = polykv.plan_for(model, prompt[0], BUDGET)
    plan = polykv.plan_for(model, prompt[0], BUDGET, head_allocation="adakv")
    assert set(plan.policies) == {"kvzip"} and list(plan.budgets) == list(layers.budgets)
    assert sum(plan.budgets) == dims.num_layers * BUDGET
    assert len(set(plan.budgets)) > 1, "the learned allocation is the uniform one"
    for layer, heads in enumerate(plan.head_budgets):
        assert len(heads) == dims.num_kv_heads and sum(heads) == dims.num_kv_heads * plan.budgets[layer]
    cache = polykv.make_cache(model, BUDGET, head_allocation="adakv")
    with torch.no_grad():
        adapter.forward(model, prompt, cache)
    assert cache.applied_plan == plan
    kept = sum(min(b, n) for heads in plan.head_budgets for b in heads)
    itemsize = next(model.parameters()).element_size()
    assert cache_bytes(cache) == kept * dims.head_dim * 2 * itemsize
    assert padding_bytes(cache) == 0
    with compress(model, cache_factory=lambda: polykv.make_cache(model, BUDGET, head_allocation="adakv")):
        generated = greedy_generate(model, prompt)
    assert_same_greedy(generated, simulator_greedy(model, prompt, plan, capture=polykv.capture))
