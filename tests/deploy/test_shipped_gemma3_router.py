"""The shipped Gemma3-270M router (``checkpoints/gemma3-270m``, fitted with ``configs/gemma3-270m-floor.yaml``):
it loads with its layer floor, plans Gemma3 with the exact total and every layer at or above the floor at the
tightest budget it was validated at, and the deployed cache applies that plan and holds what it says (a sliding
layer at most its window less one)."""

import pytest
import torch

from polykv_learn import adapter
from polykv_learn.cache import cache_bytes
from polykv_learn.deploy.artifact import read_artifact
from polykv_learn.deploy.polykv import PolyKV

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROUTER = "checkpoints/gemma3-270m"
BUDGET = 64  # the tightest validated budget, where the earlier router (b_min 4) left sliding layers 4-17 positions


@pytest.fixture(scope="module")
def gemma3():
    from polykv_learn.models import load_model

    return load_model("gemma3-270m")


def test_the_shipped_gemma3_router_keeps_its_floor_and_deploys_its_plan(gemma3):
    model, tokenizer = gemma3
    polykv = PolyKV.from_pretrained(ROUTER)
    assert polykv.b_min == 32
    validation = read_artifact(ROUTER)[0]["validation"]
    assert sorted(int(b) for b in validation) == [64, 128, 256, 512]
    for row in validation.values():  # shipped only if ahead of the best single policy at every budget
        assert row["learned"] < row["best_uniform"], row
    text = " ".join(f"Item {i} is stored in box {i * 7 % 101}, next to a lamp." for i in range(90))
    prompt = tokenizer(text + " The item in box 14 is item", return_tensors="pt").input_ids[:, -700:]
    n = prompt.shape[1]
    dims = adapter.model_dims(model)
    windows = adapter.sliding_windows(model)
    plan = polykv.plan_for(model, prompt[0], BUDGET)
    assert sum(plan.budgets) == dims.num_layers * BUDGET
    assert all(polykv.b_min <= b <= n for b in plan.budgets), plan.budgets
    cache = polykv.make_cache(model, BUDGET)
    with torch.no_grad():
        adapter.forward(model, prompt, cache)
    assert cache.applied_plan == plan
    held = sum(min(b, n, n if w is None else w - 1) for b, w in zip(plan.budgets, windows, strict=True))
    itemsize = next(model.parameters()).element_size()
    assert cache_bytes(cache) == held * dims.num_kv_heads * dims.head_dim * 2 * itemsize
