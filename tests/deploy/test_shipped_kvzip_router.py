"""The shipped KVzip-allocation SmolLM2 router (``checkpoints/smollm2-135m-kvzip``, fitted with
``configs/smollm2-135m-kvzip-alloc.yaml``): one routed policy (kvzip), so every layer is on KVzip's scores and only
the layer allocation is learned; validated ahead of uniform kvzip at every budget; its AdaKV split keeps every
layer's and the plan's total exactly; the deployed ragged cache holds exactly the kept positions, and greedy
generation through it equals greedy decoding on the simulator for the same plan."""

import pytest
from shipped_helpers import assert_exact_head_totals, assert_ragged_cache_deploys_the_plan, box_prompt_ids

from polykv_learn.deploy.artifact import read_artifact
from polykv_learn.deploy.polykv import PolyKV

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROUTER = "checkpoints/smollm2-135m-kvzip"
BUDGET = 48


def test_the_shipped_kvzip_router_plans_kvzip_everywhere_and_deploys_as_the_simulator(smollm2):
    model, tokenizer = smollm2
    polykv = PolyKV.from_pretrained(ROUTER)
    assert list(polykv.policies) == ["kvzip"] and polykv.head_allocation == "adakv"
    assert polykv.allocation_prior == "kvzip_global"
    validation = read_artifact(ROUTER)[0]["validation"]
    assert sorted(int(b) for b in validation) == [128, 256, 512, 1024]
    for row in validation.values():  # shipped only if ahead of uniform kvzip (its pool's one policy) everywhere
        assert row["learned"] < row["best_uniform"] == row["kvzip"], row
    prompt = box_prompt_ids(tokenizer)
    layers = polykv.plan_for(model, prompt[0], BUDGET)
    plan = polykv.plan_for(model, prompt[0], BUDGET, head_allocation="adakv")
    assert set(plan.policies) == {"kvzip"} and list(plan.budgets) == list(layers.budgets)
    assert len(set(plan.budgets)) > 1, "the learned allocation is the uniform one"
    assert_exact_head_totals(plan, model, BUDGET, prompt.shape[1])
    assert_ragged_cache_deploys_the_plan(polykv, model, prompt, plan, BUDGET, "adakv")
