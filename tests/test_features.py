"""Layer signals (design §5): each feature against a naive computation, plus the scaler."""

from __future__ import annotations

import json
import math
from itertools import combinations

import pytest
import torch
from policy_helpers import random_layer_stats

from polykv_learn.features import (
    BASE_FEATURE_NAMES,
    DEFAULT_OVERLAP_POLICIES,
    FEATURE_NAMES,
    NUM_SINKS,
    FeatureScaler,
    feature_names,
    layer_features,
)
from polykv_learn.policies import get_policy, keep_indices
from polykv_learn.policies.base import LayerStats

OVERLAP = ("snapkv", "streaming", "tova", "knorm")


def hand_stats(attn: torch.Tensor, keys: torch.Tensor | None = None, layer_idx: int = 0) -> LayerStats:
    """Unpadded stats around a given window attention ``(1, H, w, n)`` (one KV head per query head)."""
    _, h, w, n = attn.shape
    d = 4
    keys = torch.randn(1, h, n, d, generator=torch.Generator().manual_seed(0)) if keys is None else keys
    zeros_wd = torch.zeros(1, w, d)
    return LayerStats(
        keys=keys,
        values=torch.zeros(1, h, n, d),
        window_queries=torch.zeros(1, h, w, d),
        window_attn=attn,
        valid=torch.ones(1, n, dtype=torch.bool),
        positions=torch.arange(n)[None],
        scaling=0.5,
        window_cos=zeros_wd,
        window_sin=zeros_wd,
        future_cos=torch.zeros(1, 2, d),
        future_sin=torch.zeros(1, 2, d),
        layer_idx=layer_idx,
    )


def col(name: str, overlap=OVERLAP) -> int:
    return feature_names(overlap).index(name)


def test_names_and_shape():
    stats = random_layer_stats(batch=2, n=50, window=8)
    out = layer_features(stats, 10, OVERLAP, num_layers=4)
    names = feature_names(OVERLAP)
    assert out.shape == (2, len(names)) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert FEATURE_NAMES == feature_names(DEFAULT_OVERLAP_POLICIES)
    assert "overlap:snapkv|streaming" in names and len(names) == len(BASE_FEATURE_NAMES) + 6
    assert len(set(names)) == len(names)
    assert feature_names([]) == feature_names(["snapkv"]) == layer_names_without_overlap()
    assert layer_features(stats, 10, [], num_layers=4).shape == (2, len(BASE_FEATURE_NAMES))


def layer_names_without_overlap() -> list[str]:
    return [n for n in FEATURE_NAMES if not n.startswith("overlap:")]


def test_uniform_attention():
    n, w, h, budget = 40, 6, 2, 8
    stats = hand_stats(torch.full((1, h, w, n), 1.0 / n), layer_idx=3)
    f = layer_features(stats, budget, OVERLAP, num_layers=5)[0]
    assert f[col("entropy")] == pytest.approx(1.0, abs=1e-6)
    assert f[col("sink_mass")] == pytest.approx(NUM_SINKS / n, abs=1e-6)
    assert f[col("recent_mass")] == pytest.approx(w / n, abs=1e-6)
    assert f[col("coverage@0.5B")] == pytest.approx((budget // 2) / n, abs=1e-6)
    assert f[col("coverage@1B")] == pytest.approx(budget / n, abs=1e-6)
    assert f[col("coverage@2B")] == pytest.approx(2 * budget / n, abs=1e-6)
    assert f[col("temporal_variance")] == pytest.approx(0.0, abs=1e-9)
    assert f[col("depth")] == pytest.approx(0.75)
    assert f[col("log_n")] == pytest.approx(math.log(n))
    assert f[col("budget_ratio")] == pytest.approx(budget / n)
    # streaming keeps sinks + recent; with uniform attention tova keeps the most recent (ties -> recent)
    assert f[col("overlap:streaming|tova")] == pytest.approx(4 / 12, abs=1e-6)


def test_one_hot_attention():
    n, w, h = 30, 5, 2
    attn = torch.zeros(1, h, w, n)
    attn[..., 2] = 1.0  # every query attends only to position 2 (a sink)
    f = layer_features(hand_stats(attn), 100, OVERLAP, num_layers=1)[0]
    assert f[col("entropy")] == pytest.approx(0.0, abs=1e-7)
    assert f[col("sink_mass")] == pytest.approx(1.0)
    assert f[col("recent_mass")] == pytest.approx(0.0)
    assert f[col("coverage@0.5B")] == pytest.approx(1.0)
    assert f[col("temporal_variance")] == pytest.approx(0.0, abs=1e-9)
    assert f[col("depth")] == 0.0  # a single layer
    assert f[col("budget_ratio")] == 1.0  # capped
    assert f[col("overlap:snapkv|knorm")] == 1.0  # budget >= n: everything kept by every policy


def test_temporal_variance_of_switching_attention():
    n, w = 20, 4
    attn = torch.zeros(1, 1, w, n)
    for i in range(w):
        attn[0, 0, i, 10 + i] = 1.0  # query i attends only to position 10 + i
    f = layer_features(hand_stats(attn), 4, OVERLAP, num_layers=2)[0]
    # each attended position: p = 1/w of the queries give it 1 -> variance p (1 - p); w such positions
    assert f[col("temporal_variance")] == pytest.approx(1 - 1 / w, abs=1e-6)
    assert f[col("entropy")] == pytest.approx(0.0, abs=1e-7)


def test_key_norm_spread():
    n = 12
    norms = torch.arange(1.0, n + 1)
    keys = torch.zeros(1, 1, n, 4)
    keys[0, 0, :, 1] = norms
    stats = hand_stats(torch.full((1, 1, 3, n), 1.0 / n), keys=keys)
    f = layer_features(stats, 4, OVERLAP, num_layers=2)[0]
    expected = norms.std(correction=0) / norms.mean()
    assert f[col("key_norm_spread")] == pytest.approx(float(expected), rel=1e-5)


def naive_features(stats: LayerStats, budget: int, overlap, num_layers: int) -> torch.Tensor:
    """Loops over batch, heads and queries; float64."""
    rows = []
    batch, h, w, n = stats.window_attn.shape
    for b in range(batch):
        valid = stats.valid[b]
        nv = int(valid.sum())
        attn = stats.window_attn[b].double()  # (H, w, n)
        ent = []
        for i in range(h):
            for q in range(w):
                p = attn[i, q][attn[i, q] > 0]
                ent.append(float(-(p * p.log()).sum()))
        entropy = sum(ent) / len(ent) / math.log(nv)
        mean = attn.mean(dim=(0, 1))  # (n,)
        sink_pos = [j for j in range(n) if valid[j] and int(stats.positions[b, j]) < NUM_SINKS]
        sink = float(mean[sink_pos].sum())
        recent = float(mean[n - w :].sum())
        ordered = sorted(mean.tolist(), reverse=True)
        cov = [sum(ordered[: min(max(k, 1), n)]) for k in (budget // 2, budget, 2 * budget)]
        temporal = 0.0
        for j in range(n):
            if valid[j]:
                temporal += sum(float(attn[i, :, j].var(correction=0)) for i in range(h)) / h
        jac = []
        for p, q in combinations(overlap, 2):
            kp = keep_indices(get_policy(p), stats, budget)[b]
            kq = keep_indices(get_policy(q), stats, budget)[b]
            vals = []
            for g in range(kp.shape[0]):
                sp, sq = set(kp[g].tolist()), set(kq[g].tolist())
                vals.append(len(sp & sq) / len(sp | sq))
            jac.append(sum(vals) / len(vals))
        spreads = []
        for g in range(stats.keys.shape[1]):
            norms = stats.keys[b, g][valid].double().norm(dim=-1)
            spreads.append(float(norms.std(correction=0) / norms.mean()))
        depth = stats.layer_idx / max(num_layers - 1, 1)
        rows.append(
            [entropy, sink, recent, *cov, temporal, *jac, sum(spreads) / len(spreads), depth, math.log(nv)]
            + [min(budget / nv, 1.0)]
        )
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("budget", [1, 7, 16, 60])
def test_matches_naive_on_random_padded_stats(budget):
    stats = random_layer_stats(batch=3, kv_heads=2, heads=4, n=40, window=6, pad=7, seed=budget, layer_idx=2)
    fast = layer_features(stats, budget, OVERLAP, num_layers=6).double()
    slow = naive_features(stats, budget, OVERLAP, num_layers=6)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_one_statistics_object_serves_every_budget():
    """Budget-free signals and keep orders are computed once per statistics object (an evaluation sweep asks
    for the features at four budgets), and every budget still matches the naive computation."""
    stats = random_layer_stats(batch=2, kv_heads=2, heads=4, n=40, window=6, pad=5, seed=11, layer_idx=1)
    for budget in (3, 12, 25, 60):
        fast = layer_features(stats, budget, OVERLAP, num_layers=4).double()
        torch.testing.assert_close(fast, naive_features(stats, budget, OVERLAP, num_layers=4), rtol=1e-5, atol=1e-5)
    orders = [k for k in stats._memo if k[0] == "order"]
    assert "layer_features" in stats._memo and len(orders) == len(OVERLAP)


def test_feature_errors():
    stats = random_layer_stats(batch=1, n=20, window=4, pad=0, layer_idx=3)
    with pytest.raises(ValueError, match="layer_idx=3 is outside"):
        layer_features(stats, 4, OVERLAP, num_layers=3)
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        layer_features(stats, 0, OVERLAP, num_layers=4)
    with pytest.raises(ValueError, match="duplicates"):
        layer_features(stats, 4, ["snapkv", "snapkv"], num_layers=4)
    with pytest.raises(ValueError, match="unknown policy 'bogus'; known policies"):
        feature_names(["bogus"])


def test_scaler_round_trip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 3.0, 0.0]) + 4.0
    scaler = FeatureScaler().fit(x)
    z = scaler.transform(x)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[:, :4].mean(dim=0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, :4].std(dim=0, correction=0), torch.ones(4), atol=1e-4, rtol=0)
    assert float(scaler.std[4]) == pytest.approx(FeatureScaler.MIN_STD)  # constant column: floored
    loaded = FeatureScaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    torch.testing.assert_close(loaded.transform(x), z)
    torch.testing.assert_close(loaded.inverse_transform(z), x, atol=1e-4, rtol=1e-5)
    assert scaler.transform(x[None]).shape == (1, 100, 5)


def test_scaler_errors():
    with pytest.raises(ValueError, match="not fitted"):
        FeatureScaler().transform(torch.zeros(2, 3))
    scaler = FeatureScaler().fit(torch.randn(10, 3))
    with pytest.raises(ValueError, match="fitted on 3 features, got 4"):
        scaler.transform(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"shape \(N, F\)"):
        FeatureScaler().fit(torch.zeros(5))
    with pytest.raises(ValueError, match="needs keys 'mean' and 'std'"):
        FeatureScaler.from_dict({"mean": [0.0]})
