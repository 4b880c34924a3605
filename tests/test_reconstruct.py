"""KVzip's reconstruction pass (polykv_learn.reconstruct) and how capture runs it: scores against a naive float64
reference (the model run on context + repeat prompt + context with eager attention), left-padded rows equal to
each row alone, chunking invisible, the pass only when needed, its own K/V gone afterwards."""

import pytest
import torch
from model_helpers import (
    TINY_MODELS,
    float64_pairs,
    left_pad,
    left_padded_prefill,
    random_ids,
    spy_grouped_flash,
)

from polykv_learn import adapter
from polykv_learn import reconstruct as reconstruct_module
from polykv_learn.cache import CompressedCache, row_stats
from polykv_learn.capture import CaptureOptions
from polykv_learn.models import load_tokenizer
from polykv_learn.plan import Plan
from polykv_learn.reconstruct import REPEAT_PROMPT, repeat_prompt_ids

PROMPT = (198, 198, 8401, 253, 1125, 2023, 30, 198)  # any token ids: the tests give their own repeat prompt


@pytest.fixture(scope="module")
def f64_models():
    """name -> (model for the pass, the same weights with plain eager attention for the reference), float64."""
    return float64_pairs("eager")


def captured(model, ids, mask=None, **options):
    cache = CompressedCache(model, capture=CaptureOptions(reconstruct=True, reconstruct_prompt=PROMPT, **options))
    kwargs = {}
    if mask is not None:
        kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}
    with torch.no_grad():
        adapter.forward(model, ids, cache, logits_to_keep=1, **kwargs)
    return cache


@torch.no_grad()
def naive_reconstruct_attn(ref_model, context):
    """Per layer (G, n): the eager attention of [context, prompt, context] from every position after the context
    on each context position, max over the heads of each KV group and over those positions."""
    n = context.shape[1]
    seq = torch.cat([context, torch.tensor([PROMPT]), context], dim=1)
    attentions = ref_model(seq, output_attentions=True).attentions  # L x (1, H, T, T)
    g = ref_model.config.num_key_value_heads
    out = []
    for a in attentions:
        rows = a[0, :, n:, :n]  # (H, p + n, n): every query of the pass, keys of the context
        out.append(rows.reshape(g, -1, *rows.shape[1:]).amax(dim=(1, 2)))  # (G, n)
    return out


@pytest.mark.parametrize("name", TINY_MODELS)
def test_reconstruct_attn_equals_the_naive_float64_reference(f64_models, name):
    ours, ref = f64_models[name]
    context = random_ids(37, seed=1)
    expected = naive_reconstruct_attn(ref, context)
    whole = captured(ours, context, reconstruct_chunk=512).layer_stats
    chunked = captured(ours, context, reconstruct_chunk=7).layer_stats  # many forwards: the same scores
    for a, b in zip(whole, chunked, strict=True):
        assert torch.allclose(a.reconstruct_attn, b.reconstruct_attn, rtol=0, atol=1e-13)
    for chunk, stats in ((512, whole), (7, chunked)):
        for layer, (s, e) in enumerate(zip(stats, expected, strict=True)):
            assert s.reconstruct_attn.shape == (1, ours.config.num_key_value_heads, 37)
            diff = (s.reconstruct_attn[0] - e).abs().max().item()
            # transformers' eager attention takes its softmax in float32 even for a float64 model
            assert diff < 1e-6, f"{name} layer {layer} chunk {chunk}: {diff}"
    assert max(float(e.max()) for e in expected) > 0.2, "the reference must have peaky attention to compare"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_a_left_padded_row_scores_as_it_would_alone(f64_models, name):
    ours, _ = f64_models[name]
    prompts = [random_ids(41, seed=2), random_ids(23, seed=3), random_ids(30, seed=4)]
    ids, mask = left_pad(prompts)
    batch = captured(ours, ids, mask, reconstruct_chunk=16).layer_stats
    for r, prompt in enumerate(prompts):
        alone = captured(ours, prompt).layer_stats
        for b, a in zip(batch, alone, strict=True):
            pad = ids.shape[1] - prompt.shape[1]
            assert torch.allclose(row_stats(b, r).reconstruct_attn, a.reconstruct_attn, rtol=0, atol=1e-12)
            assert not b.reconstruct_attn[r, :, :pad].any()  # padding positions score 0


def test_the_default_repeat_prompt_is_kvzips_instruction_in_the_models_tokenizer(f64_models):
    model, _ = f64_models["tiny-llama"]
    ids = load_tokenizer("tiny-llama")(REPEAT_PROMPT, add_special_tokens=False).input_ids
    assert repeat_prompt_ids(model, CaptureOptions()) == tuple(ids) and len(ids) > 5
    assert repeat_prompt_ids(model, CaptureOptions(reconstruct_prompt=[5, 6])) == (5, 6)


def test_the_pass_leaves_the_context_cache_as_it_was(tiny_models):
    """The pass's own K/V are dropped: the cache holds the prefill alone, and the next token continues at n."""
    model = tiny_models["tiny-qwen3"]
    context, probe = random_ids(60, seed=5), random_ids(4, seed=6)
    plain = CompressedCache(model, capture=CaptureOptions())
    with torch.no_grad():
        adapter.forward(model, context, plain)
        want = adapter.forward(model, probe, plain).logits
    cache = captured(model, context, reconstruct_chunk=16)
    for got, ref in zip(cache.layers, plain.layers, strict=True):
        assert got.keys.shape[2] == 60 and got.get_seq_length() == 60
        assert torch.equal(got.keys, ref.keys[:, :, :60]) and torch.equal(got.values, ref.values[:, :, :60])
    with torch.no_grad():
        assert torch.equal(adapter.forward(model, probe, cache).logits, want)


def test_the_pass_runs_only_when_a_policy_needs_it(tiny_models, monkeypatch):
    model = tiny_models["tiny-llama"]
    calls = []
    original = reconstruct_module.reconstruction_attention
    monkeypatch.setattr(
        reconstruct_module, "reconstruction_attention", lambda *a, **k: calls.append(a[1].shape) or original(*a, **k)
    )
    context = random_ids(50, seed=7)
    for plan, runs in [
        (Plan.uniform("snapkv", 16, 4), False),
        (Plan.from_lists(["snapkv", "h2o", "keydiff", "tova"], [16] * 4), False),
        (Plan.from_lists(["snapkv", "kvzip", "keydiff", "tova"], [16] * 4), True),
    ]:
        calls.clear()
        cache = CompressedCache(model, plan=plan)
        assert cache.capture_options.reconstruct == runs
        with torch.no_grad():
            adapter.forward(model, context, cache)
        assert calls == ([(1, 50)] if runs else [])
        assert [layer.keys.shape[2] for layer in cache.layers] == [16] * 4


def test_a_static_kvzip_plan_evicts_after_the_pass_as_a_compressed_capture_does(tiny_models):
    """Every layer keeps its full cache until the pass (its queries attend to all of it), then evicts."""
    model = tiny_models["tiny-mistral"]
    context = random_ids(70, seed=8)
    plan = Plan.from_lists(["kvzip", "streaming", "kvzip", "keydiff"], [12, 20, 9, 30])
    static = CompressedCache(model, plan=plan)
    capture = CompressedCache(model)  # capture only: every statistic, the reconstruction attention included
    with torch.no_grad():
        adapter.forward(model, context, static)
        adapter.forward(model, context, capture)
    assert all(s.reconstruct_attn is not None for s in capture.layer_stats)
    capture.compress(plan)
    assert static.applied_plans == [plan]
    for got, ref in zip(static.layers, capture.layers, strict=True):
        assert torch.equal(got.keys, ref.keys) and torch.equal(got.values, ref.values)
        assert got.stats is None and got.pending is None


def test_inputs_embeds_cannot_be_reconstructed(tiny_models):
    model = tiny_models["tiny-llama"]
    cache = CompressedCache(model, plan=Plan.uniform("kvzip", 8, 4))
    embeds = model.get_input_embeddings()(random_ids(20, seed=9))
    with pytest.raises(ValueError, match=r"needs the prefill's token ids: call the model with input_ids, not inputs"):
        with torch.no_grad():
            model(inputs_embeds=embeds, use_cache=True, **{adapter.cache_kwarg(model): cache})


def test_capture_options_reject_bad_reconstruction_settings():
    with pytest.raises(ValueError, match=r"^CaptureOptions.reconstruct_chunk must be >= 1, got 0$"):
        CaptureOptions(reconstruct_chunk=0)
    with pytest.raises(ValueError, match=r"^CaptureOptions.reconstruct_prompt is empty"):
        CaptureOptions(reconstruct_prompt=())
    for bad in ("Repeat", [1, -2], [1.5], [True]):
        with pytest.raises(ValueError, match=r"^CaptureOptions.reconstruct_prompt must be token ids"):
            CaptureOptions(reconstruct_prompt=bad)
    assert CaptureOptions(reconstruct_prompt=[3, 4]).reconstruct_prompt == (3, 4)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_unpadded_fused_pass_takes_the_maskless_calls_and_equals_the_explicit_probabilities(name, monkeypatch):
    """Without padding, a full-attention layer's fused pass runs the context and the pass's earlier keys through
    flash calls without a mask, query heads stacked per KV group (``grouped_flash``), and its own block causally:
    the same scores as the explicit softmax. The 8-token prompt and 41-token context take 4 forwards of 16, so the
    earlier keys are 16, 32 and 48 long."""
    seen = spy_grouped_flash(monkeypatch)
    model, ids, mask, positions, kv = left_padded_prefill(name, lengths=(41, 41))
    assert mask.all()
    args = (model, ids, kv, mask.bool(), positions, PROMPT, 16)
    fused = reconstruct_module.reconstruction_attention(*args)
    explicit = reconstruct_module.reconstruction_attention(*args, fused=False)
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    full_layers = sum(t == "full_attention" for t in types)
    assert sorted(set(seen)) == [16, 32, 41, 48] and len(seen) == full_layers * (4 + 3)
    for layer, (f, e) in enumerate(zip(fused, explicit, strict=True)):
        assert f.shape == e.shape == (2, model.config.num_key_value_heads, 41)
        rel = ((f - e).abs().max() / e.abs().max()).item()
        assert rel <= (1e-6 if layer == 0 else 3e-6), f"{name} layer {layer}: {rel}"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_fused_float32_pass_equals_the_explicit_probabilities(name):
    """A float32 model's fused pass (flash output + log-sum-exp scores) against the explicit softmax reference on
    the same left-padded batch (tiny-gemma3: sliding-window layers): layer 0, which both see the same inputs of,
    to 1e-6 of the largest score; later layers read the previous layers' outputs, whose float32 rounding differs."""
    model, ids, mask, positions, kv = left_padded_prefill(name)
    args = (model, ids, kv, mask.bool(), positions, PROMPT, 16)
    fused = reconstruct_module.reconstruction_attention(*args)
    explicit = reconstruct_module.reconstruction_attention(*args, fused=False)
    for layer, (f, e) in enumerate(zip(fused, explicit, strict=True)):
        assert f.dtype == e.dtype == torch.float32 and f.shape == e.shape == (3, model.config.num_key_value_heads, 41)
        rel = ((f - e).abs().max() / e.abs().max()).item()
        assert rel <= (1e-6 if layer == 0 else 3e-6), f"{name} layer {layer}: {rel}"
        assert not f[1, :, :18].any() and not f[2, :, :11].any()  # padding positions score 0
    assert max(float(e.max()) for e in explicit) > 0.2, "the reference must have peaky attention to compare"
