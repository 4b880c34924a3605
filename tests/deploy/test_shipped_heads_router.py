"""The shipped head-wise SmolLM2 router (``checkpoints/smollm2-135m-heads``, fitted with ``model.head_allocation:
learned``): it loads, plans SmolLM2 with the exact layer total and per-layer head totals, its learned split is not
the even one, the deployed ragged cache holds exactly the kept positions, and greedy generation through it equals
greedy decoding on the simulator for the same plan."""

import pytest
from shipped_helpers import assert_exact_head_totals, assert_ragged_cache_deploys_the_plan, box_prompt_ids

from polykv_learn.deploy.polykv import PolyKV

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROUTER = "checkpoints/smollm2-135m-heads"
BUDGET = 48


def test_the_shipped_heads_router_plans_exact_head_totals_and_deploys_as_the_simulator(smollm2):
    model, tokenizer = smollm2
    polykv = PolyKV.from_pretrained(ROUTER)
    assert polykv.head_allocation == "learned"
    prompt = box_prompt_ids(tokenizer)
    plan = polykv.plan_for(model, prompt[0], BUDGET, head_allocation="learned")
    assert_exact_head_totals(plan, model, BUDGET, prompt.shape[1])
    assert any(len(set(heads)) > 1 for heads in plan.head_budgets), "the learned split is the even one"
    assert_ragged_cache_deploys_the_plan(polykv, model, prompt, plan, BUDGET, "learned")
