"""Calibrated static plans in the artifact (format 2): round trip, validation on load, older artifacts still load,
``static_plan`` serves them rescaled exactly (docs/artifact-format.md)."""

import json

import pytest
from artifact_helpers import make_artifact

from polykv_learn.budgets import rescale_budgets
from polykv_learn.deploy.artifact import read_artifact
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.models import build_tiny_model
from polykv_learn.plan import Plan


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("tiny-llama")


def calibrated(tiny, tmp_path):
    """A tiny artifact's copy with calibrated plans at B = 16 and 40 (n = 100, b_min 4)."""
    layers = tiny.config.num_hidden_layers
    router = PolyKV.from_pretrained(make_artifact(tmp_path / "router", tiny))
    plans = {
        16: Plan.from_lists(["snapkv", "knorm"] * (layers // 2), [4, 28] * (layers // 2)),
        40: Plan.from_lists(["streaming"] * layers, [10, 70] * (layers // 2)),
    }
    copy = router.with_calibrated_plans(plans, context_length=100, b_min=4, info={"samples": ["a"]})
    return router, copy.save_pretrained(tmp_path / "calibrated"), plans


def test_calibrated_plans_round_trip_and_serve_static_mode(tiny, tmp_path):
    router, directory, plans = calibrated(tiny, tmp_path)
    config, _ = read_artifact(directory)
    assert config["format"] == "polykv-learn/2" and config["calibrated"]["calibration"] == {"samples": ["a"]}
    loaded = PolyKV.from_pretrained(directory)
    assert loaded.calibrated_plans == plans
    assert loaded.static_plan(16) == plans[16] and loaded.static_plan(40) == plans[40]  # grid budgets: as calibrated
    layers = tiny.config.num_hidden_layers
    for budget, source in ((20, 16), (30, 40), (64, 40), (8, 16)):  # nearest in log scale: 30 -> 40, 20 -> 16
        plan = loaded.static_plan(budget)
        assert plan.policies == plans[source].policies
        assert sum(plan.budgets) == layers * budget and min(plan.budgets) >= min(4, budget)
        assert plan.budgets == tuple(
            rescale_budgets(plans[source].budgets, layers * budget, min(4, budget), tiny.config.max_position_embeddings)
        )
        assert loaded.make_cache(tiny, budget, mode="static").plan == plan
    assert router.static_plan(20) == router.router_static_plan(20) == loaded.router_static_plan(20)
    assert loaded.save_pretrained(tmp_path / "again") and PolyKV.from_pretrained(tmp_path / "again").calibrated_plans


def test_format_1_artifact_still_loads_without_calibrated_plans(tiny, tmp_path):
    directory = make_artifact(tmp_path / "old", tiny)
    config = json.loads((directory / "polykv.json").read_text())
    config["format"] = "polykv-learn/1"
    (directory / "polykv.json").write_text(json.dumps(config))
    old = PolyKV.from_pretrained(directory)
    assert old.config["format"] == "polykv-learn/1" and old.calibrated_plans == {}
    assert old.static_plan(32) == old.router_static_plan(32)
    config["calibrated"] = {"context_length": 100, "b_min": 4, "plans": {}}
    (directory / "polykv.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="calibrated must be absent in format 'polykv-learn/1'"):
        PolyKV.from_pretrained(directory)


def test_bundled_artifact_static_plan_keeps_the_exact_total():
    polykv = PolyKV.from_pretrained("checkpoints/smollm2-135m")
    assert polykv.config["format"] in ("polykv-learn/1", "polykv-learn/2")
    assert polykv.static_plan(128).total_budget == 30 * 128


CASES = [
    ("context_length", 0, "calibrated.context_length must be an integer >= 1, got 0"),
    ("context_length", 10**6, "calibrated.context_length must be <= model.max_positions (8192), got 1000000"),
    ("b_min", "4", "calibrated.b_min must be an integer >= 1, got a string ('4')"),
    ("plans", {}, "calibrated.plans must be a non-empty object (budget -> plan), got an object"),
    ("plans.16.budgets", [4, 28, 4, 29], "calibrated.plans['16'].budgets must sum to L * B = 64, got 65"),
    ("plans.16.budgets", [3, 29, 4, 28], "calibrated.plans['16'].budgets must be a list of 4 integers in [4, 100]"),
    ("plans.40.budgets", [10, 70, 10], "calibrated.plans['40'].budgets must be a list of 4 integers in [4, 100]"),
    ("plans.16.policies", ["snapkv"] * 3, "calibrated.plans['16'].policies must be a list of 4 policy names"),
    ("plans.16.policies", ["nope"] * 4, "calibrated.plans['16'].policies[0] must be a registered policy"),
    ("plans", {"x": {}}, "calibrated.plans keys must be budgets (integers in [1, 100], as strings), got a string"),
    ("calibration", [], "calibrated.calibration must be an object, got an empty list"),
]


@pytest.mark.parametrize("path,value,message", CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CASES])
def test_calibrated_plans_are_checked_on_load(tiny, tmp_path, path, value, message):
    _, directory, _ = calibrated(tiny, tmp_path)
    config = json.loads((directory / "polykv.json").read_text())
    node, *rest, last = ["calibrated", *path.split(".")]
    target = config[node]
    for key in rest:
        target = target[key]
    target[last] = value
    (directory / "polykv.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        PolyKV.from_pretrained(directory)
    text = str(info.value)
    assert text.startswith(f"corrupt artifact {directory}: ") and message in text and "\n" not in text


def test_with_calibrated_plans_refuses_an_inexact_plan(tiny, tmp_path):
    router = PolyKV.from_pretrained(make_artifact(tmp_path / "router", tiny))
    bad = {16: Plan.uniform("snapkv", 17, tiny.config.num_hidden_layers)}
    with pytest.raises(ValueError, match=r"calibrated.plans\['16'\].budgets must sum to L \* B = 64, got 68"):
        router.with_calibrated_plans(bad, context_length=100, b_min=4)


@pytest.mark.parametrize("seed", range(5))
def test_rescale_is_exact_bounded_and_order_preserving(seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    budgets = (torch.rand(12, generator=gen) * 300 + 1).long().tolist()
    for total in (12 * 3, 12 * 50, sum(budgets), 12 * 400):
        out = rescale_budgets(budgets, total, 3, 500)
        assert sum(out) == total and all(3 <= b <= 500 for b in out)
        for i in range(12):
            for j in range(12):
                if budgets[i] > budgets[j]:
                    assert out[i] >= out[j]
    assert rescale_budgets(budgets, sum(budgets), 1, 500) == budgets  # already exact: unchanged


def test_rescale_bad_input_is_one_line():
    with pytest.raises(ValueError, match=r"budgets must be positive integers, got 0 at layer 1"):
        rescale_budgets([4, 0], 8, 1, 10)
    with pytest.raises(ValueError, match=r"total 30 is above 2 layers x upper bound 10"):
        rescale_budgets([4, 4], 30, 1, 10)
    with pytest.raises(ValueError, match=r"total must be an integer"):
        rescale_budgets([4, 4], 8.5, 1, 10)
