"""The adakv / adakv-global evaluation baselines (AdaKV, arXiv:2407.11550, with SnapKV scores): exact totals per
layer and per head, the plans of Plan.adakv / Plan.adakv_global, and head-wise forks through the evaluator."""

import pytest
from artifact_helpers import make_artifact
from eval_helpers import batched_equals_single
from policy_helpers import random_layer_stats

from polykv_learn.capture import CaptureOptions
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.eval.methods import (
    LEARNED_METHODS,
    MethodInput,
    available_methods,
    default_method_names,
    resolve_methods,
)
from polykv_learn.models import load_model
from polykv_learn.plan import Plan


def layers(num_layers=4, n=60, seed=0):
    return [random_layer_stats(batch=1, pad=0, n=n, seed=seed + i, layer_idx=i) for i in range(num_layers)]


@pytest.mark.parametrize("budget", [1, 5, 16, 33, 59])
def test_adakv_methods_keep_the_exact_totals(budget):
    stats = layers()
    methods = available_methods()
    for name, build in (("adakv", Plan.adakv), ("adakv-global", Plan.adakv_global)):
        plan = methods[name].plan(MethodInput(stats), budget)
        assert plan == build("snapkv", budget, stats)
        assert plan.policies == ("snapkv",) * 4 and plan.total_budget == 4 * budget
        assert all(sum(h) == 3 * b for h, b in zip(plan.head_budgets, plan.budgets, strict=True))
        assert all(min(h) >= int(0.2 * budget) and max(h) <= 60 for h in plan.head_budgets)
        assert plan.kept_per_head(60) == budget
    assert methods["adakv"].plan(MethodInput(stats), budget).budgets == (budget,) * 4


def test_adakv_methods_keep_a_short_context_and_are_defaults():
    stats = layers(n=30)
    available = available_methods()
    for name in ("adakv", "adakv-global"):
        assert available[name].plan(MethodInput(stats), 30) == Plan.uniform("snapkv", 30, 4)
        assert available[name].kind == "allocation" and name in default_method_names(available)


def test_headwise_forks_batched_equal_one_at_a_time():
    """The evaluator's fork batch holds head-wise forks (each head padded behind its mask) and gives every row what
    its fork gives alone; records count the kept positions per head and the fork's bytes (no padding: ragged)."""
    capture = CaptureOptions(window=16, future=16, accumulate=True)
    batched = batched_equals_single(["snapkv", "adakv", "adakv-global"], capture, (24, 64))
    adakv = [r for r in batched.records if r["method"] == "adakv"]
    assert {r["kept"] for r in adakv} == {24, 64}
    plan = batched.plans["adakv"][24]
    assert any(len(set(h)) > 1 for h in plan.head_budgets), "the allocation must be uneven somewhere"
    snap = next(r for r in batched.records if r["method"] == "snapkv" and r["budget"] == 24)
    row = next(r for r in adakv if r["budget"] == 24)
    # the same kept positions and nothing more: a fork layer whose heads differ holds one tensor per head (ragged.py)
    assert row["kv_bytes"] == snap["kv_bytes"]


def test_polykv_heads_is_the_routers_plan_split_by_adakv(tmp_path):
    """polykv-heads: polykv's adaptive plan of the sample, each layer then split among its KV heads by AdaKV under
    its own policy (floor 0.2 b_l); a learned default method; nothing split when n <= B."""
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    router = PolyKV.from_pretrained(make_artifact(tmp_path / "tiny", model, random_allocator=True))
    stats = [random_layer_stats(batch=1, pad=0, kv_heads=2, n=60, seed=i, layer_idx=i) for i in range(4)]
    methods = available_methods(router)
    for budget in (5, 16, 33):
        plan = methods["polykv-heads"].plan(MethodInput(stats), budget)
        learned = methods["polykv"].plan(MethodInput(stats), budget)
        assert plan == learned.with_adakv_heads(stats) and plan.with_head_budgets(None) == learned
        assert all(sum(h) == 2 * b for h, b in zip(plan.head_budgets, plan.budgets, strict=True))
        assert all(
            min(h) >= int(0.2 * b) and max(h) <= 60 for h, b in zip(plan.head_budgets, plan.budgets, strict=True)
        )
    assert methods["polykv-heads"].plan(MethodInput(stats), 60) == methods["polykv"].plan(MethodInput(stats), 60)
    assert methods["polykv-heads"].kind == "learned" and "polykv-heads" in LEARNED_METHODS
    assert "polykv-heads" in default_method_names(methods)
    with pytest.raises(ValueError, match="'polykv-heads' needs --router DIR"):
        resolve_methods(["polykv-heads"], available_methods())
