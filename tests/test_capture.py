"""Prefill statistics: window and accumulated (H2O) attention against naive loops; cheap features via ranks."""

import torch
from policy_helpers import random_layer_stats

from polykv_learn.capture import accumulated_attention, window_attention
from polykv_learn.features import layer_features
from polykv_learn.policies import get_policy, keep_ranks


def _naive_attention_rows(q, k, valid, scaling, rows):
    b, h, _, d = q.shape
    g = k.shape[1]
    out = torch.zeros(b, h, len(rows), k.shape[2], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for r, i in enumerate(rows):
                if not valid[bi, i]:
                    continue
                seen = [j for j in range(i + 1) if valid[bi, j]]
                s = torch.stack([q[bi, hi, i] @ k[bi, hi // (h // g), j] * scaling for j in seen])
                out[bi, hi, r, seen] = torch.softmax(s, dim=0)
    return out


def test_accumulated_and_window_attention_match_naive_loops():
    gen = torch.Generator().manual_seed(0)
    b, h, g, n, d = 2, 6, 3, 37, 8
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, g, n, d, generator=gen, dtype=torch.float64)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    naive = _naive_attention_rows(q, k, valid, 0.3, list(range(n)))
    acc = accumulated_attention(q, k, valid, 0.3, chunk=10)
    assert torch.allclose(acc.double(), naive.sum(dim=2), atol=1e-5)
    win = window_attention(q[:, :, -7:], k, valid, 0.3)
    assert torch.allclose(win.double(), naive[:, :, -7:], atol=1e-5)
    unpadded = torch.ones(b, n, dtype=torch.bool)  # no padding anywhere: the in-place causal path
    naive = _naive_attention_rows(q, k, unpadded, 0.3, list(range(n)))
    assert torch.allclose(accumulated_attention(q, k, unpadded, 0.3, chunk=10).double(), naive.sum(dim=2), atol=1e-5)


def test_features_from_precomputed_ranks_equal_features_from_sorting():
    stats = random_layer_stats(layer_idx=1)
    policies = ["snapkv", "streaming", "tova", "knorm"]
    ranks = {p: keep_ranks(get_policy(p), stats) for p in policies}
    for budget in (3, 10, 40):
        direct = layer_features(stats, budget, policies, num_layers=4)
        fast = layer_features(stats, budget, policies, num_layers=4, ranks=ranks)
        assert torch.equal(direct, fast)
