"""Routers that may route to KVzip: an adaptive (layerwise) cache runs the reconstruction pass only if some row of
some layer may get KVzip, those layers alone keep their statistics until the pass, and plans and keep sets equal
those from every layer's full statistics. A router without the new policies plans exactly as before."""

import hashlib
from pathlib import Path

import pytest
import torch
from adaptive_helpers import depth_router, left_padded, prefill
from artifact_helpers import make_artifact

from polykv_learn import reconstruct as reconstruct_module
from polykv_learn.cache import CompressedCache
from polykv_learn.deploy.artifact import read_artifact, write_artifact
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.features import feature_names

BUNDLED = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m"


@pytest.fixture()
def passes(monkeypatch):
    """The batch shapes of every reconstruction pass run."""
    calls = []
    original = reconstruct_module.reconstruction_attention
    monkeypatch.setattr(
        reconstruct_module, "reconstruction_attention", lambda *a, **k: calls.append(a[1].shape) or original(*a, **k)
    )
    return calls


def test_only_layers_routed_to_kvzip_wait_for_the_pass(tiny_models, tmp_path, passes):
    model = tiny_models["tiny-llama"]
    routed = ("streaming", "kvzip", "tova", "keydiff")  # layer l gets routed[l]
    polykv = depth_router(tmp_path / "zip", model, routed, scale=3.0)
    assert polykv.capture.reconstruct and polykv.capture.accumulate is False
    ids, mask = left_padded()
    cache = polykv.make_cache(model, budget=32)
    on_prefill, waiting = cache.on_prefill, []

    def checked(layer, call):
        on_prefill(layer, call)
        if layer.layer_idx < len(cache.layers) - 1:  # before the pass: only the kvzip layer keeps statistics
            waiting.append([la.pending is not None for la in cache.layers[: layer.layer_idx + 1]])
            assert all(la.stats is None for la in cache.layers[: layer.layer_idx + 1])
            if layer.layer_idx == 1:
                assert [set(o) for o in layer.orders.orders] == [set()] * 3  # kvzip's orders wait
                assert [set(w) for w in layer.pending[1]] == [{"kvzip"}] * 3

    cache.on_prefill = checked
    prefill(model, cache, ids, mask)
    assert waiting == [[False], [False, True], [False, True, False]]
    assert passes == [(3, 150)]
    assert [p.policies for p in cache.applied_plans] == [routed] * 3
    capture = CompressedCache(model, capture=polykv.capture)
    prefill(model, capture, ids, mask)
    expected = polykv.plans_for_stats(capture.layer_stats, 32)
    assert cache.applied_plans == expected == polykv.plan_for(model, ids, 32, attention_mask=mask)
    capture.compress(expected)
    for got, ref in zip(cache.layers, capture.layers, strict=True):
        assert torch.equal(got.keys, ref.keys) and torch.equal(got.values, ref.values)
        assert got.pending is None and got.orders is None


def test_no_pass_when_no_row_may_get_kvzip(tiny_models, tmp_path, passes):
    model = tiny_models["tiny-mistral"]
    polykv = depth_router(tmp_path / "nozip", model, ("streaming", "snapkv", "kvzip"), scale=1.0)  # round(l / 3)
    ids, mask = left_padded()
    cache = polykv.make_cache(model, budget=32)
    prefill(model, cache, ids, mask)
    assert passes == []
    assert {p for plan in cache.applied_plans for p in plan.policies} == {"streaming", "snapkv"}
    assert cache.applied_plans == polykv.plan_for(model, ids, 32, attention_mask=mask)  # this one did run it
    assert passes == [(3, 150)]


def test_a_router_whose_summary_reads_kvzip_summarises_after_the_pass(tiny_models, tmp_path, passes):
    """kvzip among the overlap policies (a layer signal) but not routed: the pass runs, and every layer is
    summarised after it."""
    model = tiny_models["tiny-qwen3"]
    path = make_artifact(tmp_path / "ov", model, policies=("snapkv", "keydiff"))
    config, tensors = read_artifact(path)
    config = {k: v for k, v in config.items() if k != "format"}
    config["overlap_policies"] = ["snapkv", "kvzip"]
    config["feature_names"] = feature_names(["snapkv", "kvzip"])
    polykv = PolyKV.from_pretrained(write_artifact(path, config, tensors))
    assert polykv.capture.reconstruct and polykv.layerwise_planner(32).summarize_reads_reconstruct_attn
    ids, mask = left_padded()
    cache = polykv.make_cache(model, budget=32)
    on_prefill, seen = cache.on_prefill, []

    def checked(layer, call):
        on_prefill(layer, call)
        if layer.layer_idx < len(cache.layers) - 1:  # nothing summarised before the pass: statistics kept
            assert all(la.summary is None and la.stats is not None for la in cache.layers[: layer.layer_idx + 1])
        seen.append(layer.layer_idx)

    cache.on_prefill = checked
    prefill(model, cache, ids, mask)
    assert seen == [0, 1, 2, 3] and passes == [(3, 150)]
    capture = CompressedCache(model, capture=polykv.capture)
    prefill(model, capture, ids, mask)
    assert cache.applied_plans == polykv.plans_for_stats(capture.layer_stats, 32)


def test_the_bundled_router_loads_and_plans_as_before():
    """checkpoints/smollm2-135m routes to none of the new policies: same capture (H2O, no reconstruction pass)
    and the same router static plans as before KeyDiff and KVzip existed (digest computed with the earlier code; the
    calibrated static plans the artifact now also holds are checked in tests/deploy/test_calibrated_artifact.py)."""
    polykv = PolyKV.from_pretrained(BUNDLED)
    assert "kvzip" not in polykv.policies and "keydiff" not in polykv.policies
    assert polykv.capture.accumulate and not polykv.capture.reconstruct
    assert not polykv.layerwise_planner(128).summarize_reads_reconstruct_attn
    routed = {b: polykv.router_static_plan(b) for b in (64, 128, 256, 512, 1024)}
    plans = [(b, plan.policies, plan.budgets) for b, plan in routed.items()]
    digest = hashlib.sha256(repr(plans).encode()).hexdigest()
    assert digest == "7d09913ef0058ff4a034b768bf3fc31096b1f07fb53665808517dc62a9f72db6", plans


def test_an_artifacts_reconstruction_scope_is_read_from_its_capture(tiny_models, tmp_path):
    """No scope key (every artifact made before the option): scope "full"; a chunk-scope artifact's cache scores
    with the chunk scope (the adaptive cache's plans equal those from every layer's chunk-scope statistics); a bad
    scope is refused in one line."""
    model = tiny_models["tiny-llama"]
    old = depth_router(tmp_path / "old", model, ("streaming", "kvzip", "tova", "keydiff"), scale=3.0)
    assert old.capture.reconstruct_scope == "full" and "reconstruct_scope" not in old.config["capture"]
    config, tensors = read_artifact(tmp_path / "old")
    config = {k: v for k, v in config.items() if k != "format"}
    scope = {"reconstruct_scope": "chunk", "reconstruct_context_chunk": 16, "reconstruct_sinks": 2}
    config["capture"] = {**config["capture"], **scope}
    chunk = PolyKV.from_pretrained(write_artifact(tmp_path / "chunk", config, tensors))
    opts = chunk.capture
    assert (opts.reconstruct_scope, opts.reconstruct_context_chunk, opts.reconstruct_sinks) == ("chunk", 16, 2)
    assert opts.reconstruct and (opts.window, opts.future, opts.chunk) == (old.capture.window, 16, 64)
    ids, mask = left_padded()
    cache = chunk.make_cache(model, budget=32)
    prefill(model, cache, ids, mask)
    capture = CompressedCache(model, capture=opts)
    prefill(model, capture, ids, mask)
    full = CompressedCache(model, capture=old.capture)
    prefill(model, full, ids, mask)
    assert cache.applied_plans == chunk.plans_for_stats(capture.layer_stats, 32)
    assert not torch.equal(capture.layer_stats[1].reconstruct_attn, full.layer_stats[1].reconstruct_attn)
    config["capture"]["reconstruct_scope"] = "local"
    with pytest.raises(ValueError, match=r"capture.reconstruct_scope must be absent, 'full' or 'chunk', got a str"):
        write_artifact(tmp_path / "bad", config, tensors)
