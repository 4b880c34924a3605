"""PolyKV artifacts in generate: adaptive and static plans, real eviction, clear errors for bad artifacts."""

import json

import pytest
import torch
from artifact_helpers import make_artifact
from model_helpers import random_ids

from polykv_learn.cache import cache_bytes
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.simulator import Simulator


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_models):
    return make_artifact(tmp_path_factory.mktemp("art") / "tiny", tiny_models["tiny-llama"], random_allocator=True)


def _simulated_greedy(model, prompt, plan, steps, capture_options):
    sim = Simulator(model, capture_options)
    capture = sim.capture(prompt, accumulate=True)
    tokens = [int(capture.last_logits.argmax())]
    bias = sim.hard_biases(capture, [plan])
    for _ in range(steps - 1):
        logits = sim.probe_logits(capture, torch.tensor([tokens]), bias)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def test_adaptive_generate_applies_plan_for_and_matches_the_simulator(tiny_models, artifact):
    model = tiny_models["tiny-llama"]
    polykv = PolyKV.from_pretrained(artifact)
    prompt = random_ids(150, seed=21)
    plan = polykv.plan_for(model, prompt[0], budget=32)  # one sequence (n,): one Plan
    assert polykv.plan_for(model, prompt, budget=32) == [plan]  # a batch (1, n): one Plan per row
    assert plan.total_budget == 4 * 32 and len(set(plan.budgets)) > 1  # a non-uniform plan
    cache = polykv.make_cache(model, budget=32)
    out = model.generate(prompt, cache=cache, max_new_tokens=12, do_sample=False)
    assert cache.applied_plan == plan and cache.applied_plans == [plan]
    assert out[0, 150:].tolist() == _simulated_greedy(model, prompt, plan, 12, polykv.capture)
    dims = polykv.model_fingerprint
    per_key = dims["num_kv_heads"] * dims["head_dim"] * 2 * 4
    assert cache_bytes(cache) == sum(b + 11 for b in plan.budgets) * per_key  # 11 generated tokens cached


def test_static_mode_evicts_during_prefill_with_the_calibrated_plan(tiny_models, artifact):
    model = tiny_models["tiny-llama"]
    polykv = PolyKV.from_pretrained(artifact)
    plan = polykv.static_plan(64)
    assert plan.total_budget == 4 * 64
    cache = polykv.make_cache(model, budget=64, mode="static")
    with torch.no_grad():
        model(random_ids(200, seed=22), cache=cache)
    dims = polykv.model_fingerprint
    kept = sum(plan.effective_budgets(200))  # a layer budget above the context keeps the whole context
    assert cache_bytes(cache) == kept * dims["num_kv_heads"] * dims["head_dim"] * 2 * 4


def test_apply_context_manager_uses_a_fresh_compressed_cache(tiny_models, artifact):
    model = tiny_models["tiny-llama"]
    polykv = PolyKV.from_pretrained(artifact)
    prompt = random_ids(120, seed=23)
    with polykv.apply(model, budget=32):
        inside = model.generate(prompt, max_new_tokens=8, do_sample=False)
    cache = polykv.make_cache(model, budget=32)
    explicit = model.generate(prompt, cache=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(inside, explicit)
    assert "generate" not in model.__dict__  # restored


def test_save_pretrained_round_trip(tiny_models, artifact, tmp_path):
    model = tiny_models["tiny-llama"]
    polykv = PolyKV.from_pretrained(artifact)
    copy = PolyKV.from_pretrained(polykv.save_pretrained(tmp_path / "copy"))
    prompt = random_ids(90, seed=24)
    assert copy.plan_for(model, prompt, 16) == polykv.plan_for(model, prompt, 16)


def test_artifact_for_another_model_is_refused(tiny_models, artifact):
    polykv = PolyKV.from_pretrained(artifact)
    with pytest.raises(ValueError, match=r"trained for tiny-llama .*kv_heads=2.* but the model is tiny-mistral"):
        polykv.make_cache(tiny_models["tiny-mistral"], budget=32)


def test_bad_budgets_are_refused(tiny_models, artifact):
    polykv = PolyKV.from_pretrained(artifact)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="budget must be a positive integer"):
            polykv.make_cache(tiny_models["tiny-llama"], budget=bad)
    with pytest.raises(ValueError, match="mode must be one of adaptive, static"):
        polykv.make_cache(tiny_models["tiny-llama"], budget=8, mode="eager")


def test_prompt_shorter_than_the_budget_is_not_evicted(tiny_models, artifact):
    model = tiny_models["tiny-llama"]
    polykv = PolyKV.from_pretrained(artifact)
    prompt = random_ids(20, seed=25)
    cache = polykv.make_cache(model, budget=64)
    out = model.generate(prompt, cache=cache, max_new_tokens=6, do_sample=False)
    full = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, full)


def test_corrupt_or_partial_artifacts_fail_clearly(tiny_models, artifact, tmp_path):
    broken = make_artifact(tmp_path / "broken", tiny_models["tiny-llama"])
    (broken / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete artifact .*weights.safetensors is missing"):
        PolyKV.from_pretrained(broken)
    bad_json = make_artifact(tmp_path / "badjson", tiny_models["tiny-llama"])
    (bad_json / "polykv.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PolyKV.from_pretrained(bad_json)
    truncated = make_artifact(tmp_path / "trunc", tiny_models["tiny-llama"])
    data = (truncated / "weights.safetensors").read_bytes()
    (truncated / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read"):
        PolyKV.from_pretrained(truncated)
    missing_key = make_artifact(tmp_path / "nokey", tiny_models["tiny-llama"])
    config = json.loads((missing_key / "polykv.json").read_text())
    del config["scaler"]
    (missing_key / "polykv.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="corrupt artifact"):
        PolyKV.from_pretrained(missing_key)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PolyKV.from_pretrained(tmp_path / "nowhere")


def test_adaptive_cache_is_freed_without_the_garbage_collector(tiny_models, artifact):
    """The adaptive planner records the plan on its cache through a weak reference: no cache -> planner -> cache
    cycle keeping K/V alive until the cyclic collector runs."""
    import gc
    import weakref

    from polykv_learn import adapter

    model = tiny_models["tiny-llama"]
    polykv = PolyKV.from_pretrained(artifact)
    gc.collect()
    gc.disable()
    try:
        cache = polykv.make_cache(model, budget=32)
        with torch.no_grad():
            adapter.forward(model, random_ids(150, seed=22), cache, logits_to_keep=1)
        assert cache.applied_plans is not None  # the planner ran and its plan was applied
        keys = weakref.ref(cache.layers[0].keys)
        del cache
        assert keys() is None
    finally:
        gc.enable()
