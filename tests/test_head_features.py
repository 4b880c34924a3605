"""Per-KV-head signals (issue #17): each head's columns equal the layer signals of that head's GQA group alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from policy_helpers import random_layer_stats

from polykv_learn.features import BASE_FEATURE_NAMES, layer_features
from polykv_learn.head_features import HEAD_FEATURE_NAMES, head_features
from polykv_learn.policies.base import LayerStats

SHARED = ["entropy", "sink_mass", "recent_mass", "coverage@0.5B", "coverage@1B", "coverage@2B", "key_norm_spread",
          "depth", "budget_ratio"]  # fmt: skip


def group_alone(stats: LayerStats, g: int) -> LayerStats:
    """The statistics of KV head ``g`` and its query heads only (a layer with one KV head)."""
    size = stats.group_size
    heads = slice(g * size, (g + 1) * size)
    return dataclasses.replace(
        stats,
        keys=stats.keys[:, g : g + 1],
        values=stats.values[:, g : g + 1],
        window_queries=stats.window_queries[:, heads],
        window_attn=stats.window_attn[:, heads],
    )


@pytest.mark.parametrize("budget", [3, 10, 40])
def test_each_head_equals_its_group_alone(budget):
    stats = random_layer_stats(batch=2, kv_heads=3, heads=6, n=50, pad=5, layer_idx=2)
    got = head_features(stats, budget, num_layers=4)  # (batch, G, Fh)
    assert got.shape == (2, 3, len(HEAD_FEATURE_NAMES))
    columns = [BASE_FEATURE_NAMES.index(name) for name in SHARED]
    for g in range(3):
        alone = layer_features(group_alone(stats, g), budget, (), num_layers=4)  # (batch, F)
        torch.testing.assert_close(got[:, g], alone[:, columns], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[:, 0, :7], got[:, 1, :7])  # heads differ


def test_bad_arguments_are_refused():
    stats = random_layer_stats()
    with pytest.raises(ValueError, match=r"^budget must be a positive integer, got 0$"):
        head_features(stats, 0, 4)
    with pytest.raises(ValueError, match=r"^stats.layer_idx=5 is outside \[0, num_layers=4\)$"):
        head_features(dataclasses.replace(stats, layer_idx=5), 8, 4)
