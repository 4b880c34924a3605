"""Helpers of the tests of shipped SmolLM2 routers: a retrieval-style prompt, the checks of a head-wise plan's
totals, and of its deployed ragged cache against the plan and the simulator."""

import torch
from greedy_helpers import assert_same_greedy, greedy_generate, simulator_greedy

from polykv_learn import adapter
from polykv_learn.cache import cache_bytes, padding_bytes
from polykv_learn.deploy import compress


def box_prompt_ids(tokenizer):
    """(1, 320) ids of a list of items in boxes ending in a question about one of them."""
    text = " ".join(
        f"Item {i} is stored in box {(i * 7) % 101}, next to a {('red', 'blue')[i % 2]} lamp." for i in range(80)
    )
    return tokenizer(text + " To sum up, the item in box 14 is item", return_tensors="pt").input_ids[:, -320:]


def assert_exact_head_totals(plan, model, budget: int, n: int) -> None:
    """The plan keeps ``L * budget`` in all, and every layer's KV heads share exactly ``G * b_l`` within ``[0, n]``."""
    dims = adapter.model_dims(model)
    assert sum(plan.budgets) == dims.num_layers * budget
    assert plan.head_budgets is not None
    for layer, heads in enumerate(plan.head_budgets):
        assert len(heads) == dims.num_kv_heads and sum(heads) == dims.num_kv_heads * plan.budgets[layer]
        assert all(0 <= b <= n for b in heads)


def assert_ragged_cache_deploys_the_plan(polykv, model, prompt, plan, budget: int, head_allocation: str) -> None:
    """After the prefill the router's cache applied ``plan`` and every KV head holds exactly its kept positions (no
    padding); greedy generation through the router's adaptive cache equals the simulator's under that plan."""
    n = prompt.shape[1]
    cache = polykv.make_cache(model, budget, head_allocation=head_allocation)
    with torch.no_grad():
        adapter.forward(model, prompt, cache)
    assert cache.applied_plan == plan
    kept = sum(min(b, n) for heads in plan.head_budgets for b in heads)
    itemsize = next(model.parameters()).element_size()
    assert cache_bytes(cache) == kept * adapter.model_dims(model).head_dim * 2 * itemsize
    assert padding_bytes(cache) == 0
    with compress(model, cache_factory=lambda: polykv.make_cache(model, budget, head_allocation=head_allocation)):
        generated = greedy_generate(model, prompt)
    assert_same_greedy(generated, simulator_greedy(model, prompt, plan, capture=polykv.capture))
