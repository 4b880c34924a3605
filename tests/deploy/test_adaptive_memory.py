"""An adaptive cache summarises each layer as soon as its prefill attention is done (issue 14): from then until the
plan, the layer holds its keys/values, its summary and the keep orders of its rows' candidate policies, never its
scoring statistics (window attention, accumulated attention, window queries, RoPE tables); H2O's accumulated
attention is computed only for layers routed to H2O; the keep sets are those of the statistics."""

import gc
import weakref

import numpy as np
import pytest
import torch
from adaptive_helpers import LENGTHS, depth_router, left_padded, prefill
from artifact_helpers import make_artifact

from polykv_learn import cache as cache_module
from polykv_learn.cache import CompressedCache, row_stats
from polykv_learn.deploy import make_cache
from polykv_learn.deploy.artifact import read_artifact, write_artifact
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.layerwise import KeepOrders, LayerwisePlanner
from polykv_learn.plan import Plan
from polykv_learn.planner.router import GBDTRouter
from polykv_learn.policies import get_policy, keep_indices, policy_names

ROUTED = ("streaming", "snapkv", "h2o", "tova", "knorm", "expected_attention")
#: what a layer's statistics hold beyond its keys/values, positions and validity
HEAVY = ("window_attn", "accumulated_attn", "window_queries", "window_cos", "window_sin", "future_cos", "future_sin")
#: the policy the depth router below gives layers 0..3 (layer l: x = 5 l / 3, policy round(x) of ROUTED)
BY_DEPTH = ["streaming", "h2o", "tova", "expected_attention"]


@pytest.fixture(scope="module")
def polykv(tmp_path_factory, tiny_models):
    """A linear router on the relative depth: logit_k = k x - k^2 / 2 with x = 5 depth, so layer l gets policy
    round(5 l / 3) (margins of 1/6 between the two best logits: no near tie)."""
    return depth_router(tmp_path_factory.mktemp("mem") / "tiny", tiny_models["tiny-llama"], ROUTED, 5.0)


def test_each_layer_drops_its_statistics_as_soon_as_its_prefill_ends(tiny_models, polykv, monkeypatch):
    model = tiny_models["tiny-llama"]
    ids, mask = left_padded()
    n = ids.shape[1]
    # per layer: field -> weak reference to the memory of that tensor of the statistics (alive while any tensor,
    # a view or a detached alias of it, holds that memory)
    heavy: dict[int, dict[str, weakref.ref]] = {}
    compute, accumulate = cache_module.compute_layer_stats, cache_module.with_accumulated_attention

    def record(stats):
        refs = heavy.setdefault(stats.layer_idx, {})
        refs.update(
            {f: weakref.ref(getattr(stats, f).untyped_storage()) for f in HEAVY if getattr(stats, f) is not None}
        )
        return stats

    monkeypatch.setattr(cache_module, "compute_layer_stats", lambda *a, **k: record(compute(*a, **k)))
    monkeypatch.setattr(cache_module, "with_accumulated_attention", lambda *a, **k: record(accumulate(*a, **k)))
    cache = polykv.make_cache(model, budget=32)
    assert isinstance(cache.planner, LayerwisePlanner) and cache.capture_options.accumulate  # h2o is routed
    on_prefill, seen = cache.on_prefill, []

    def checked(layer, call):
        on_prefill(layer, call)
        done = layer.layer_idx + 1
        # the costliest statistic exists only where a row is routed to h2o: layer 1
        assert ("accumulated_attn" in heavy[layer.layer_idx]) == (BY_DEPTH[layer.layer_idx] == "h2o")
        for i in range(done):  # without a garbage collection: nothing keeps them, not even a reference cycle
            assert cache.layers[i].stats is None
            assert all(ref() is None for ref in heavy[i].values()), (layer.layer_idx, i)
            if done < len(cache.layers):  # waiting for the plan: whole K/V, a summary, the chosen policy's orders
                held = cache.layers[i]
                assert held.keys.shape[2] == n and held.summary is not None and held.orders.lengths == LENGTHS
                assert [set(o) for o in held.orders.orders] == [{BY_DEPTH[i]}] * 3
                orders = [o[BY_DEPTH[i]] for o in held.orders.orders]
                assert [(o.dtype, tuple(o.shape)) for o in orders] == [(torch.int16, (2, m)) for m in LENGTHS]
        seen.append(done)

    cache.on_prefill = checked
    gc.collect()
    gc.disable()
    try:
        prefill(model, cache, ids, mask)
    finally:
        gc.enable()
    assert seen == [1, 2, 3, 4]
    assert [p.policies for p in cache.applied_plans] == [tuple(BY_DEPTH)] * 3
    assert all(layer.summary is None and layer.orders is None for layer in cache.layers)  # compressed: all gone
    # a capture-only cache (what plan_for and the evaluation read) still captures everything, H2O included
    capture = CompressedCache(model, capture=polykv.capture)
    prefill(model, capture, ids, mask)
    assert all(s.accumulated_attn is not None for s in capture.layer_stats)
    assert cache.applied_plans == polykv.plan_for(model, ids, 32, attention_mask=mask)


def test_a_gbdt_router_plans_and_keeps_as_from_every_layers_statistics(tiny_models, tmp_path):
    """A GBDT router's per-layer choice is exact row by row: each row's candidates are its routed policy alone, and
    the plans and keep sets equal those from every layer's whole statistics."""
    model = tiny_models["tiny-qwen3"]
    path = make_artifact(tmp_path / "g", model, policies=ROUTED, random_allocator=True)
    config, tensors = read_artifact(path)
    names = config["feature_names"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(names)))
    depth, log_n = names.index("depth"), names.index("log_n")
    x[:, depth], x[:, log_n] = rng.uniform(0, 1, 400), rng.uniform(3.5, 5.5, 400)
    near = (x[:, depth] > 0.2) & (x[:, depth] < 0.5)  # layer 1 of 4: h2o; else by length (rows of 150 / 90, 55)
    labels = np.where(near, "h2o", np.where(x[:, log_n] > 4.6, "snapkv", "tova"))
    arrays, meta = GBDTRouter(max_iter=10, max_depth=3).fit(x, labels).to_state()
    tensors.update({f"gbdt.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    config = {**{k: v for k, v in config.items() if k != "format"}, "router": {**config["router"], "type": "gbdt"}}
    config["router"]["gbdt"] = meta
    polykv = PolyKV.from_pretrained(write_artifact(path, config, tensors))
    ids, mask = left_padded()
    cache = polykv.make_cache(model, budget=32)
    kept = []  # per layer, per row: the policies whose keep orders the layer kept

    for layer in cache.layers:

        def recording(planner, accumulate, layer=layer, summarize=layer.summarize, **kwargs):
            summarize(planner, accumulate, **kwargs)
            kept.append([set(o) for o in layer.orders.orders])

        layer.summarize = recording
    prefill(model, cache, ids, mask)
    capture = CompressedCache(model, capture=polykv.capture)
    prefill(model, capture, ids, mask)
    expected = polykv.plans_for_stats(capture.layer_stats, 32)
    assert cache.applied_plans == expected
    long_row, short_rows = ("snapkv", "h2o", "snapkv", "snapkv"), ("tova", "h2o", "tova", "tova")
    assert [p.policies for p in expected] == [long_row, short_rows, short_rows]
    assert kept == [[{p.policies[i]} for p in expected] for i in range(4)]
    capture.compress(expected)
    for got, ref in zip(cache.layers, capture.layers, strict=True):
        assert torch.equal(got.keys, ref.keys) and torch.equal(got.values, ref.values)


def test_keep_orders_give_the_keep_sets_of_the_statistics(tiny_models):
    model = tiny_models["tiny-qwen3"]
    ids, mask = left_padded(seed=9)
    cache = CompressedCache(model, capture=cache_module.CaptureOptions(window=16, accumulate=True, reconstruct=True))
    prefill(model, cache, ids, mask)
    for stats in cache.layer_stats:
        rows = [row_stats(stats, r) for r in range(3)]
        orders = KeepOrders.of(rows, [policy_names()] * 3)
        for r, rs in enumerate(rows):
            for p in policy_names():
                for budget in (1, 7, 40, rs.context_length - 1, rs.context_length, rs.context_length + 5):
                    expected = keep_indices(get_policy(p), rs, budget)[0]
                    assert torch.equal(orders.keep_indices(r, p, budget), expected), (p, r, budget)
    with pytest.raises(ValueError, match=r"no keep order for policy 'h2o' in row 1: this layer kept snapkv only"):
        KeepOrders.of(rows, [[], ["snapkv"], []]).keep_indices(1, "h2o", 8)


def test_a_layerwise_planner_plans_the_same_from_summaries_or_statistics(tiny_models):
    """A custom LayerwisePlanner: its summaries taken during the prefill give the plans it gives the statistics of
    a capture-only cache (its ``__call__``)."""
    model = tiny_models["tiny-mistral"]
    ids, mask = left_padded(seed=5)

    def summarize(stats):  # (batch,) mass of the window attention on the first 8 positions of each row
        return torch.stack([row_stats(stats, r).window_attn[..., :8].sum() for r in range(stats.valid.shape[0])])

    def plan(summaries):
        mass = torch.stack(summaries, dim=1)  # (batch, L)
        budgets = (8 + 40 * mass / mass.max()).long().tolist()
        policies = [["snapkv" if m > row.mean() else "tova" for m in row] for row in mass]
        return [Plan.from_lists(p, b) for p, b in zip(policies, budgets, strict=True)]

    planner = LayerwisePlanner(summarize=summarize, plan=plan, policies=("snapkv", "tova"))
    cache = make_cache(model, planner=planner)
    prefill(model, cache, ids, mask)
    capture = CompressedCache(model)
    prefill(model, capture, ids, mask)
    expected = planner(capture.layer_stats)
    assert cache.applied_plans == expected and len({tuple(p.budgets) for p in expected}) == 3
    assert {p for plan in expected for p in plan.policies} == {"snapkv", "tova"}
    capture.compress(expected)
    for got, ref in zip(cache.layers, capture.layers, strict=True):
        assert torch.equal(got.keys, ref.keys) and torch.equal(got.values, ref.values)
        assert torch.equal(got.context_visible, ref.context_visible)


def test_layerwise_planner_errors(tiny_models):
    model = tiny_models["tiny-llama"]
    summarize, plan = (lambda stats: None), (lambda summaries: Plan.uniform("knorm", 16, 4))
    with pytest.raises(ValueError, match="LayerwisePlanner.policies must be a non-empty sequence of names"):
        LayerwisePlanner(summarize, plan, policies=())
    with pytest.raises(ValueError, match="LayerwisePlanner.policies must be a non-empty sequence of names"):
        LayerwisePlanner(summarize, plan, policies="snapkv")
    with pytest.raises(ValueError, match="unknown policy 'snap'"):
        LayerwisePlanner(summarize, plan, policies=("snap",))
    with pytest.raises(TypeError, match=r"summarize, plan and candidates \(if given\) must be callable"):
        LayerwisePlanner(summarize, None, policies=("snapkv",))
    with pytest.raises(TypeError, match=r"summarize, plan and candidates \(if given\) must be callable"):
        LayerwisePlanner(summarize, plan, policies=("snapkv",), candidates=[])

    ids, mask = left_padded((150, 90))

    def run(plan, candidates=None, policies=("snapkv", "tova")):
        cache = make_cache(model, planner=LayerwisePlanner(summarize, plan, policies, candidates))
        prefill(model, cache, ids, mask)
        return cache

    cases = [
        (
            plan,
            None,
            "layer 0, row 0: the plan evicts with 'knorm', but the layer's summary kept keep orders for "
            "snapkv, tova only",
        ),
        (plan, lambda summary: [{"snapkv"}], "LayerwisePlanner.candidates gave 1 rows for a batch of 2"),
        (plan, lambda summary: [{"knorm"}, set()], "LayerwisePlanner.candidates gave row 0 knorm, not in its policies"),
        (
            lambda s: Plan.uniform("snapkv", 16, 4),
            lambda summary: [{"tova"}, {"snapkv"}],
            "layer 0, row 0: the plan evicts with 'snapkv', but the layer's summary kept keep orders for tova only",
        ),
    ]
    for plan_fn, candidates, message in cases:
        with pytest.raises(ValueError) as info:
            run(plan_fn, candidates)
        assert str(info.value).startswith(message)
    cache = make_cache(model, planner=LayerwisePlanner(summarize, plan, ("snapkv",)))
    with pytest.raises(ValueError, match="the plan evicts with 'knorm'"):
        prefill(model, cache, ids, mask)
    assert all(layer.keys.shape[2] == 150 and layer.context_visible is None for layer in cache.layers)  # none evicted
    with pytest.raises(RuntimeError, match=r"summarised each layer as its prefill ended \(LayerwisePlanner\)"):
        cache.layer_stats  # noqa: B018
    # a row the plan keeps whole (budget >= its 90 tokens) needs no keep order
    per_row = [Plan.uniform("snapkv", 16, 4), Plan.uniform("knorm", 100, 4)]
    cache = run(lambda s: per_row, lambda summary: [{"snapkv"}, set()], policies=("snapkv", "knorm"))
    assert cache.applied_plans == per_row
    assert all(int(layer.context_visible[1].sum()) == 2 * 90 for layer in cache.layers)
