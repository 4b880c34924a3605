"""The property everything rests on: simulator logits == a real compressed cache's logits (design §4)."""

import pytest
import torch
from model_helpers import TINY_MODELS, random_ids

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache, cache_bytes
from polykv_learn.plan import Plan
from polykv_learn.policies import policy_names
from polykv_learn.simulator import Simulator, kl_to_full

TOL = 1e-4


def real_compressed_logits(model, context_ids, probe_ids, plan):
    """The reference path: prefill into a real CompressedCache (physical eviction), then forward the probe."""
    cache = CompressedCache(model, plan=plan)
    with torch.no_grad():
        adapter.forward(model, context_ids, cache)
        out = adapter.forward(model, probe_ids, cache)
    return out.logits[0].float(), cache


def mixed_plan(num_layers: int, n: int) -> Plan:
    names = policy_names()
    budgets = [max(1, (n // 4) * (1 + (i % 3)) // 2) for i in range(num_layers)]
    return Plan.from_lists([names[i % len(names)] for i in range(num_layers)], budgets)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_simulator_equals_real_compressed_cache_tiny(tiny_models, name):
    model = tiny_models[name]
    layers = model.config.num_hidden_layers
    context, probe = random_ids(200, seed=1), random_ids(12, seed=2)
    plans = [Plan.uniform(p, 48, layers) for p in policy_names()] + [mixed_plan(layers, 200)]
    result = Simulator(model).evaluate(context, probe, plans)
    assert result.logits.shape == (len(plans), 12, model.config.vocab_size)
    for i, plan in enumerate(plans):
        ref, cache = real_compressed_logits(model, context, probe, plan)
        diff = (result.logits[i] - ref).abs().max().item()
        assert diff <= TOL, f"{name} {plan.policies[0]}: max abs diff {diff}"
        # the real cache is physically smaller: exactly b_l keys per layer (a sliding layer at most W - 1; + the probe)
        dims = adapter.model_dims(model)
        held = plan.effective_budgets(200, adapter.sliding_windows(model))
        expected = sum((b + 12) * dims.num_kv_heads * dims.head_dim * 2 * 4 for b in held)
        assert cache_bytes(cache) == expected
    assert torch.all(result.kl > 1e-4), "evicting 3/4 of a random context must change the probe distribution"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_keep_everything_equals_unmodified_model(tiny_models, name):
    model = tiny_models[name]
    context, probe = random_ids(100, seed=3), random_ids(9, seed=4)
    plan = Plan.uniform("snapkv", 500, model.config.num_hidden_layers)  # budget > context: keep all
    result = Simulator(model).evaluate(context, probe, [plan])
    with torch.no_grad():
        full = model(torch.cat([context, probe], dim=1)).logits[0, 100:].float()
    assert (result.logits[0] - full).abs().max().item() <= TOL
    assert (result.full_logits - full).abs().max().item() <= TOL
    assert result.kl.abs().max().item() <= 1e-6


def test_eager_attention_matches_too():
    from polykv_learn.models import load_model

    model, _ = load_model("tiny-llama", attn_implementation="eager", with_tokenizer=False)
    context, probe = random_ids(90, seed=5), random_ids(7, seed=6)
    plan = mixed_plan(model.config.num_hidden_layers, 90)
    result = Simulator(model).evaluate(context, probe, [plan])
    ref, _ = real_compressed_logits(model, context, probe, plan)
    assert (result.logits[0] - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_kvzip_and_keydiff_plans_simulate_exactly(tiny_models, eager_models, name, attn):
    """KVzip's keep sets come from a second (reconstruction) pass after the prefill; the simulator's capture and
    the real cache run the same pass, so their logits agree as for every other policy."""
    model = tiny_models[name] if attn == "sdpa" else eager_models[name]
    context, probe = random_ids(150, seed=13), random_ids(9, seed=14)
    plans = [
        Plan.from_lists(["kvzip", "keydiff", "snapkv", "kvzip"], [20, 36, 28, 44]),
        Plan.from_lists(["keydiff", "kvzip", "h2o", "streaming"], [40, 16, 24, 48]),
    ]
    result = Simulator(model).evaluate(context, probe, plans)
    for i, plan in enumerate(plans):
        ref, _ = real_compressed_logits(model, context, probe, plan)
        diff = (result.logits[i] - ref).abs().max().item()
        assert diff <= TOL, f"{name} {attn} {plan.policies}: max abs diff {diff}"
    assert torch.all(result.kl > 1e-4)
    capture = Simulator(model).capture(context, reconstruct=True)
    full = adapter.sliding_windows(model).index(None)  # a full-attention layer (a window of 16 keeps all at 20)
    kvzip = capture.keep_mask(full, "kvzip", 20)
    assert not torch.equal(kvzip, capture.keep_mask(full, "keydiff", 20)), "the two policies must keep differently"
    assert not torch.equal(kvzip, capture.keep_mask(full, "snapkv", 20))


def test_kl_is_zero_for_identical_and_positive_otherwise():
    full = torch.randn(5, 11)
    logits = torch.stack([full, full + torch.randn(5, 11)])
    kl = kl_to_full(full, logits)
    assert kl[0].abs() < 1e-6 and kl[1] > 0


def test_bad_inputs(tiny_models):
    model = tiny_models["tiny-llama"]
    sim = Simulator(model)
    context, probe = random_ids(50, seed=7), random_ids(4, seed=8)
    plan = Plan.uniform("snapkv", 16, model.config.num_hidden_layers)
    with pytest.raises(ValueError, match="empty"):
        sim.evaluate(context, probe[:, :0], [plan])
    with pytest.raises(ValueError, match="batch size mismatch"):
        sim.evaluate(context, probe.expand(2, 4), [plan])
    with pytest.raises(ValueError, match="layers"):
        sim.evaluate(context, probe, [Plan.uniform("snapkv", 16, 3)])
    with pytest.raises(ValueError, match="at least one plan"):
        sim.evaluate(context, probe, [])
    with pytest.raises(TypeError, match="LongTensor"):
        sim.evaluate(context.float(), probe, [plan])


def test_context_shorter_than_window_uses_whole_context(tiny_models):
    """A 10-token context with the default 32-query window: the window is the whole context, no error."""
    model = tiny_models["tiny-llama"]
    context, probe = random_ids(10, seed=9), random_ids(3, seed=10)
    plan = Plan.uniform("snapkv", 4, model.config.num_hidden_layers)
    result = Simulator(model).evaluate(context, probe, [plan])
    ref, _ = real_compressed_logits(model, context, probe, plan)
    assert (result.logits[0] - ref).abs().max().item() <= TOL


@pytest.mark.slow
def test_simulator_equals_real_compressed_cache_smollm2(smollm2):
    model, tokenizer = smollm2
    text = " ".join(f"Item {i} is stored in box {i * 7 % 101}." for i in range(120))
    context = tokenizer(text, return_tensors="pt").input_ids[:, :600]
    probe = tokenizer(" The item in box 14 is item", return_tensors="pt").input_ids
    layers = model.config.num_hidden_layers
    # every policy: kvzip's reconstruction pass and keydiff included
    assert {"kvzip", "keydiff"} <= set(policy_names())
    plans = [Plan.uniform(p, 128, layers) for p in policy_names()] + [mixed_plan(layers, 600)]
    plans.append(Plan.uniform("streaming", 10_000, layers))  # keeps everything
    _assert_simulator_equals_real_and_full(model, context, probe, plans)


def _assert_simulator_equals_real_and_full(model, context, probe, plans, windows=None) -> None:
    """Every plan's simulated logits equal the real compressed cache's (<= TOL), and the last plan (which keeps
    everything) equals the uncompressed model; with ``windows``, each real cache layer holds the plan's effective
    budget (a sliding layer at most ``W - 1``)."""
    n = context.shape[1]
    result = Simulator(model).evaluate(context, probe, plans)
    worst = 0.0
    for i, plan in enumerate(plans):
        ref, cache = real_compressed_logits(model, context, probe, plan)
        worst = max(worst, (result.logits[i] - ref).abs().max().item())
        if windows is not None:
            held = plan.effective_budgets(n, windows)
            assert [layer.keys.shape[2] - probe.shape[1] for layer in cache.layers] == held
    with torch.no_grad():
        full = model(torch.cat([context, probe], dim=1)).logits[0, n:].float()
    assert (result.logits[-1] - full).abs().max().item() <= TOL
    assert worst <= TOL, f"max abs diff {worst}"


@pytest.mark.slow
def test_simulator_equals_real_compressed_cache_gemma3():
    """Gemma3-270M: 15 of its 18 layers slide over 512 positions, so a 600-token context already leaves some of
    every sliding layer's positions out of its window; the simulator still equals the real cache. In float64: the
    keep sets are the same in both paths, but in float32 this model amplifies the different rounding of the two
    attention paths (the real cache's sdpa, the simulator's split context/probe attention) beyond 1e-4 for some keep
    sets, which would hide whether the paths compute the same function."""
    from polykv_learn.models import load_model

    model, tokenizer = load_model("gemma3-270m", dtype=torch.float64)
    assert tokenizer.chat_template is None, "Gemma3-270M is a base model"
    windows = adapter.sliding_windows(model)
    assert windows.count(512) == 15 and windows[5::6] == [None] * 3
    text = " ".join(f"Item {i} is stored in box {i * 7 % 101}." for i in range(120))
    context = tokenizer(text, return_tensors="pt").input_ids[:, :600]
    probe = tokenizer(" The item in box 14 is item", return_tensors="pt", add_special_tokens=False).input_ids
    layers = model.config.num_hidden_layers
    plans = [Plan.uniform(p, 128, layers) for p in policy_names()] + [mixed_plan(layers, 600)]
    plans.append(Plan.uniform("streaming", 560, layers))  # more than a sliding window holds: those hold W - 1
    plans.append(Plan.uniform("streaming", 10_000, layers))  # keeps everything
    _assert_simulator_equals_real_and_full(model, context, probe, plans, windows)


def test_triton_backend_gives_the_same_simulation(tiny_models, monkeypatch):
    """POLYKV_BACKEND=triton (the interpreter on CPU) and torch give the same KL (<= 1e-5 relative)."""
    model = tiny_models["tiny-llama"]
    context, probe = random_ids(70, seed=11), random_ids(5, seed=12)
    plans = [Plan.uniform("snapkv", 20, 4), mixed_plan(4, 70)]
    monkeypatch.setenv("POLYKV_BACKEND", "torch")
    ref = Simulator(model).evaluate(context, probe, plans)
    monkeypatch.setenv("POLYKV_BACKEND", "triton")
    tri = Simulator(model).evaluate(context, probe, plans)
    assert torch.allclose(tri.kl, ref.kl, rtol=1e-5, atol=1e-7), (tri.kl, ref.kl)
    assert (tri.logits - ref.logits).abs().max().item() <= TOL
