"""An adaptive cache summarises each layer as soon as its prefill attention is done (issue 14): from then until the
plan, the layer holds its keys/values, its summary and its keep orders, never its scoring statistics (window
attention, accumulated attention, window queries, RoPE tables); the keep sets are those of the statistics."""

import gc
import weakref

import pytest
import torch
from artifact_helpers import make_artifact
from conftest import random_ids

from polykv_learn import adapter
from polykv_learn import cache as cache_module
from polykv_learn.cache import CompressedCache, row_stats
from polykv_learn.deploy import make_cache
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.layerwise import KeepOrders, LayerwisePlanner
from polykv_learn.plan import Plan
from polykv_learn.policies import get_policy, keep_indices, policy_names

ROUTED = ("streaming", "snapkv", "h2o", "tova", "knorm", "expected_attention")
#: what a layer's statistics hold beyond its keys/values, positions and validity
HEAVY = ("window_attn", "accumulated_attn", "window_queries", "window_cos", "window_sin", "future_cos", "future_sin")
PAD = 2
LENGTHS = (150, 90, 55)


@pytest.fixture(scope="module")
def polykv(tmp_path_factory, tiny_models):
    path = make_artifact(tmp_path_factory.mktemp("mem") / "tiny", tiny_models["tiny-llama"], policies=ROUTED)
    return PolyKV.from_pretrained(path)


def left_padded(lengths=LENGTHS, seed=3):
    n = max(lengths)
    ids = torch.full((len(lengths), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, m in enumerate(lengths):
        ids[i, n - m :] = random_ids(m, seed=seed + m)[0]
        mask[i, n - m :] = 1
    return ids, mask


def prefill(model, cache, ids, mask):
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what generate gives a left-padded batch
    with torch.no_grad():
        adapter.forward(model, ids, cache, attention_mask=mask, position_ids=positions, logits_to_keep=1)


def test_each_layer_drops_its_statistics_as_soon_as_its_prefill_ends(tiny_models, polykv, monkeypatch):
    model = tiny_models["tiny-llama"]
    ids, mask = left_padded()
    n = ids.shape[1]
    # per layer: field -> weak reference to the memory of that tensor of the statistics (alive while any tensor,
    # a view or a detached alias of it, holds that memory)
    heavy: list[dict[str, weakref.ref]] = []
    compute = cache_module.compute_layer_stats

    def recording(*args, **kwargs):
        stats = compute(*args, **kwargs)
        assert stats.accumulated_attn is not None  # h2o is routed: the costliest tensor exists, and must go
        heavy.append({f: weakref.ref(getattr(stats, f).untyped_storage()) for f in HEAVY})
        return stats

    monkeypatch.setattr(cache_module, "compute_layer_stats", recording)
    cache = polykv.make_cache(model, budget=32)
    assert isinstance(cache.planner, LayerwisePlanner)
    on_prefill, seen = cache.on_prefill, []

    def checked(layer, call):
        on_prefill(layer, call)
        done = layer.layer_idx + 1
        last = done == len(cache.layers)
        for i in range(done):  # without a garbage collection: nothing keeps them, not even a reference cycle
            assert cache.layers[i].stats is None
            assert all(ref() is None for ref in heavy[i].values()), (layer.layer_idx, i)
            if not last:  # waiting for the plan: whole keys/values, a summary and compact keep orders only
                held = cache.layers[i]
                assert held.keys.shape[2] == n and held.summary is not None
                assert set(held.orders.orders) == set(ROUTED) and held.orders.lengths == LENGTHS
                for p in ROUTED:
                    assert [o.dtype for o in held.orders.orders[p]] == [torch.int16] * 3
                    assert [tuple(o.shape) for o in held.orders.orders[p]] == [(2, m) for m in LENGTHS]
        seen.append(done)

    cache.on_prefill = checked
    gc.collect()
    gc.disable()
    try:
        prefill(model, cache, ids, mask)
    finally:
        gc.enable()
    assert seen == [1, 2, 3, 4]
    assert len(cache.applied_plans) == 3  # compressed: no layer holds a summary or keep orders any more
    assert all(layer.summary is None and layer.orders is None for layer in cache.layers)


def test_keep_orders_give_the_keep_sets_of_the_statistics(tiny_models):
    model = tiny_models["tiny-qwen3"]
    ids, mask = left_padded(seed=9)
    cache = CompressedCache(model, capture=cache_module.CaptureOptions(window=16, accumulate=True))
    prefill(model, cache, ids, mask)
    for stats in cache.layer_stats:
        rows = [row_stats(stats, r) for r in range(3)]
        orders = KeepOrders.of(rows, policy_names())
        for r, rs in enumerate(rows):
            for p in policy_names():
                for budget in (1, 7, 40, rs.context_length - 1, rs.context_length, rs.context_length + 5):
                    expected = keep_indices(get_policy(p), rs, budget)[0]
                    assert torch.equal(orders.keep_indices(r, p, budget), expected), (p, r, budget)
    with pytest.raises(ValueError, match=r"no keep order for policy 'h2o': this layer was summarised for snapkv only"):
        KeepOrders.of(rows, ["snapkv"]).keep_indices(0, "h2o", 8)


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
    with pytest.raises(TypeError, match="summarize and LayerwisePlanner.plan must be callable"):
        LayerwisePlanner(summarize, None, policies=("snapkv",))

    ids, mask = left_padded((150, 90))
    cache = make_cache(model, planner=LayerwisePlanner(summarize, plan, policies=("snapkv", "tova")))
    with pytest.raises(ValueError, match="the plan uses knorm, but the LayerwisePlanner kept keep orders for snapkv"):
        prefill(model, cache, ids, mask)
    assert all(layer.keys.shape[2] == 150 and layer.context_visible is None for layer in cache.layers)  # none evicted
    with pytest.raises(RuntimeError, match=r"summarised each layer as its prefill ended \(LayerwisePlanner\)"):
        cache.layer_stats  # noqa: B018
