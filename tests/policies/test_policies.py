"""Built-in policies: each scorer against a naive computation of its definition, and keep-set properties."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from policy_helpers import random_layer_stats

from polykv_learn.policies import get_policy, keep_indices, keep_ranks, policy_names
from polykv_learn.policies.base import LayerStats

ALL_POLICIES = ["streaming", "snapkv", "h2o", "tova", "knorm", "expected_attention", "keydiff", "kvzip", "random"]
BUDGETS = [1, 3, 4, 8, 10, 20, 44, 45, 46, 49, 50, 64]


@pytest.fixture(params=[6, 9], ids=["H6", "H9"])
def stats(request) -> LayerStats:
    return random_layer_stats(heads=request.param)


def group_heads(stats: LayerStats, g: int) -> list[int]:
    size = stats.window_queries.shape[1] // stats.keys.shape[1]
    return list(range(g * size, (g + 1) * size))


def test_helper_stats_are_consistent(stats):
    # Every valid query row of a causal softmax sums to one over valid keys, and never looks ahead.
    rows = stats.window_attn.sum(dim=-1)
    assert torch.allclose(rows, torch.ones_like(rows))
    n, w = stats.context_length, stats.window_size
    for i in range(w):
        assert stats.window_attn[..., i, n - w + i + 1 :].abs().max() == 0 if i < w - 1 else True
    assert stats.window_attn[1, :, :, :5].abs().max() == 0  # padding is never attended
    total = stats.accumulated_attn.sum(dim=-1)  # one unit of attention per valid query
    assert torch.allclose(total, stats.valid.sum(dim=-1, dtype=torch.float64)[:, None].expand_as(total))
    assert stats.positions[1, 5].item() == 0 and stats.positions[1, -1].item() == 44


# ---- scorers against naive definitions ---------------------------------------------------------------------


def test_streaming_scores_and_protected(stats):
    policy = get_policy("streaming")
    scores = policy.scores(stats)
    b, g, n = stats.keys.shape[:3]
    assert scores.shape == (b, g, n)
    for bi in range(b):
        for gi in range(g):
            for j in range(n):
                assert scores[bi, gi, j].item() == stats.positions[bi, j].item()
    expected = torch.zeros(b, n, dtype=torch.bool)
    expected[0, :4] = True
    expected[1, 5:9] = True  # the first four real tokens; padding (position id 1) is never a sink
    assert torch.equal(policy.protected(stats), expected)


@pytest.mark.parametrize("window_size,kernel_size", [(None, 5), (4, 3), (1, 7), (8, 1)])
def test_snapkv_matches_naive(stats, window_size, kernel_size):
    policy = get_policy("snapkv", window_size=window_size, kernel_size=kernel_size)
    scores = policy.scores(stats)
    b, g, n = stats.keys.shape[:3]
    w_used = stats.window_size if window_size is None else window_size
    w_all = stats.window_size
    expected = torch.zeros(b, g, n, dtype=torch.float64)
    for bi in range(b):
        for gi in range(g):
            heads = group_heads(stats, gi)
            mean = [0.0] * n
            for j in range(n):
                total = 0.0
                for h in heads:
                    for q in range(w_all - w_used, w_all):
                        total += stats.window_attn[bi, h, q, j].item()
                mean[j] = total / (len(heads) * w_used)
            half = kernel_size // 2
            for j in range(n):
                window = [mean[k] for k in range(j - half, j + half + 1) if 0 <= k < n]
                expected[bi, gi, j] = sum(window) / kernel_size  # zero padding counted, as avg_pool1d
    assert torch.allclose(scores, expected)
    protected = policy.protected(stats)
    assert torch.equal(protected, torch.arange(n).expand(b, n) >= n - w_used)


def test_snapkv_rejects_bad_options(stats):
    with pytest.raises(ValueError, match="odd"):
        get_policy("snapkv", kernel_size=4)
    with pytest.raises(ValueError, match="window"):
        get_policy("snapkv", window_size=99).scores(stats)


@pytest.mark.parametrize("num_recent", [None, 0, 3])
def test_h2o_matches_naive(stats, num_recent):
    policy = get_policy("h2o", num_recent=num_recent)
    assert policy.needs_accumulated_attn
    scores = policy.scores(stats)
    b, g, n = stats.keys.shape[:3]
    for bi in range(b):
        for gi in range(g):
            heads = group_heads(stats, gi)
            for j in range(n):
                naive = sum(stats.accumulated_attn[bi, h, j].item() for h in heads) / len(heads)
                assert math.isclose(scores[bi, gi, j].item(), naive, rel_tol=1e-12, abs_tol=1e-12)
    recent = stats.window_size if num_recent is None else num_recent
    expected = torch.zeros(b, n, dtype=torch.bool)
    if recent:
        expected[:, n - recent :] = True
    assert torch.equal(policy.protected(stats), expected)


def test_h2o_without_accumulated_attention_raises():
    stats = random_layer_stats()
    stats.accumulated_attn = None
    with pytest.raises(ValueError, match="h2o needs accumulated attention"):
        get_policy("h2o").scores(stats)


def test_tova_matches_naive(stats):
    policy = get_policy("tova")
    scores = policy.scores(stats)
    b, g, n = stats.keys.shape[:3]
    for bi in range(b):
        for gi in range(g):
            heads = group_heads(stats, gi)
            for j in range(n):
                naive = sum(stats.window_attn[bi, h, stats.window_size - 1, j].item() for h in heads) / len(heads)
                assert math.isclose(scores[bi, gi, j].item(), naive, rel_tol=1e-12, abs_tol=1e-15)
    expected = torch.zeros(b, n, dtype=torch.bool)
    expected[:, -1] = True
    assert torch.equal(policy.protected(stats), expected)


@pytest.mark.parametrize(("num_sinks", "num_recent"), [(4, None), (0, 0), (2, 3)])
def test_keydiff_matches_naive(stats, num_sinks, num_recent):
    """-cos(k_j, anchor), the anchor the mean of the unit keys over the row's real positions (KeyDiff)."""
    policy = get_policy("keydiff", num_sinks=num_sinks, num_recent=num_recent)
    scores = policy.scores(stats)
    b, g, n, d = stats.keys.shape
    assert scores.shape == (b, g, n) and scores.dtype == torch.float64
    for bi in range(b):
        real = [j for j in range(n) if stats.valid[bi, j]]
        for gi in range(g):
            keys = [stats.keys[bi, gi, j].tolist() for j in range(n)]
            units = [[x / math.sqrt(sum(y * y for y in k)) for x in k] for k in keys]
            anchor = [sum(units[j][e] for j in real) / len(real) for e in range(d)]
            for j in real:
                dot = sum(a * k for a, k in zip(anchor, keys[j], strict=True))
                norms = math.sqrt(sum(a * a for a in anchor)) * math.sqrt(sum(k * k for k in keys[j]))
                assert math.isclose(scores[bi, gi, j].item(), -dot / norms, rel_tol=1e-12, abs_tol=1e-12)
    recent = stats.window_size if num_recent is None else num_recent
    expected = torch.zeros(b, n, dtype=torch.bool)
    expected[0, :num_sinks] = True
    expected[1, 5 : 5 + num_sinks] = True  # the first real tokens of the padded row
    if recent:
        expected[:, n - recent :] = True
    assert torch.equal(policy.protected(stats), expected)


def test_keydiff_scores_of_a_padded_row_equal_the_row_alone(stats):
    """Padding keys never enter the anchor: row 1 cut to its real tokens scores the same."""
    alone = LayerStats(
        **{f: getattr(stats, f)[1:2, ..., 5:, :] for f in ("keys", "values")},
        **{f: getattr(stats, f)[1:2] for f in ("window_queries", "window_attn", "window_cos", "window_sin")},
        valid=stats.valid[1:2, 5:],
        positions=stats.positions[1:2, 5:],
        scaling=stats.scaling,
        future_cos=stats.future_cos[1:2],
        future_sin=stats.future_sin[1:2],
    )
    policy = get_policy("keydiff")
    assert torch.allclose(policy.scores(stats)[1, :, 5:], policy.scores(alone)[0], rtol=0, atol=1e-14)
    # padding keys far from the real ones cannot move the anchor either
    stats.keys[1, :, :5] = 1e6
    stats._memo.clear()
    assert torch.allclose(policy.scores(stats)[1, :, 5:], policy.scores(alone)[0], rtol=0, atol=1e-14)


def test_keydiff_scores_bf16_keys_in_float32():
    stats = random_layer_stats()
    half = dataclasses.replace(stats, keys=stats.keys.to(torch.bfloat16))
    scores = get_policy("keydiff").scores(half)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores.double(), get_policy("keydiff").scores(stats), atol=2e-2)


@pytest.mark.parametrize("num_sinks", [4, 0, 7])
def test_kvzip_scores_are_the_reconstruction_attention(stats, num_sinks):
    policy = get_policy("kvzip", num_sinks=num_sinks)
    assert policy.needs_reconstruct_attn and not policy.needs_accumulated_attn and policy.routable
    assert torch.equal(policy.scores(stats), stats.reconstruct_attn)
    expected = torch.zeros(stats.valid.shape, dtype=torch.bool)
    expected[0, :num_sinks] = True
    expected[1, 5 : 5 + num_sinks] = True
    assert torch.equal(policy.protected(stats), expected)


def test_kvzip_without_reconstruction_attention_raises():
    stats = random_layer_stats()
    stats.reconstruct_attn = None
    with pytest.raises(ValueError, match=r"kvzip needs the context-reconstruction attention .*reconstruct=True"):
        get_policy("kvzip").scores(stats)


def test_keydiff_and_kvzip_reject_bad_options():
    with pytest.raises(ValueError, match="^keydiff num_sinks must be >= 0, got -1$"):
        get_policy("keydiff", num_sinks=-1)
    with pytest.raises(ValueError, match="^keydiff num_recent must be >= 0 or None, got -2$"):
        get_policy("keydiff", num_recent=-2)
    with pytest.raises(ValueError, match="^kvzip num_sinks must be >= 0, got -3$"):
        get_policy("kvzip", num_sinks=-3)


def test_knorm_matches_naive(stats):
    policy = get_policy("knorm")
    scores = policy.scores(stats)
    b, g, n, d = stats.keys.shape
    for bi in range(b):
        for gi in range(g):
            for j in range(n):
                naive = -math.sqrt(sum(stats.keys[bi, gi, j, c].item() ** 2 for c in range(d)))
                assert math.isclose(scores[bi, gi, j].item(), naive, rel_tol=1e-12)
    assert policy.protected(stats) is None


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Explicit ``(d, d)`` RoPE map of one position: pairs ``(i, i + d/2)`` rotated by their angle."""
    d = cos.shape[0]
    half = d // 2
    r = torch.zeros(d, d, dtype=torch.float64)
    for i in range(half):
        c, s = cos[i].item(), sin[i].item()
        r[i, i], r[i, i + half] = c, -s
        r[i + half, i], r[i + half, i + half] = s, c
    return r


def naive_expected_attention(stats: LayerStats, num_future: int, use_value_norm: bool, epsilon: float):
    b, g, n, d = stats.keys.shape
    h_total, w = stats.window_queries.shape[1:3]
    group = h_total // g
    out = torch.zeros(b, g, n, dtype=torch.float64)
    for bi in range(b):
        # Un-rotate every window query by solving R_q x = y with its explicit RoPE matrix.
        rot = [rope_matrix(stats.window_cos[bi, q], stats.window_sin[bi, q]) for q in range(w)]
        future = [rope_matrix(stats.future_cos[bi, t], stats.future_sin[bi, t]) for t in range(num_future)]
        r_bar = sum(future) / num_future
        for h in range(h_total):
            pre = [torch.linalg.solve(rot[q], stats.window_queries[bi, h, q]) for q in range(w)]
            mu = sum(pre) / w
            sigma = sum(torch.outer(x - mu, x - mu) for x in pre) / w
            mu_bar = r_bar @ mu
            sigma_bar = r_bar @ sigma @ r_bar.T
            logits = []
            for j in range(n):
                k = stats.keys[bi, h // group, j]
                s = stats.scaling
                logits.append(s * torch.dot(mu_bar, k).item() + 0.5 * s * s * (k @ sigma_bar @ k).item())
            valid = [j for j in range(n) if stats.valid[bi, j]]
            top = max(logits[j] for j in valid)
            denom = sum(math.exp(logits[j] - top) for j in valid)
            for j in valid:
                out[bi, h // group, j] += math.exp(logits[j] - top) / denom / group
    if use_value_norm:
        out = (out + epsilon) * stats.values.norm(dim=-1)
    return out


@pytest.mark.parametrize("num_future,use_value_norm,epsilon", [(None, True, 0.0), (5, False, 0.0), (1, True, 0.02)])
def test_expected_attention_matches_naive(stats, num_future, use_value_norm, epsilon):
    policy = get_policy("expected_attention", num_future=num_future, use_value_norm=use_value_norm, epsilon=epsilon)
    scores = policy.scores(stats)
    t = stats.future_cos.shape[1] if num_future is None else num_future
    expected = naive_expected_attention(stats, t, use_value_norm, epsilon)
    assert scores.dtype == torch.float64
    valid = stats.valid[:, None, :].expand_as(scores)
    assert torch.allclose(scores[valid], expected[valid], rtol=1e-9, atol=1e-12)
    if not use_value_norm:
        assert torch.allclose(scores.sum(dim=-1), torch.ones(scores.shape[:2], dtype=torch.float64))
    assert policy.protected(stats) is None


def test_expected_attention_float32_close_to_float64():
    stats64 = random_layer_stats()
    stats32 = random_layer_stats()
    for field in ("keys", "values", "window_queries", "window_attn", "window_cos", "window_sin"):
        setattr(stats32, field, getattr(stats32, field).float())
    stats32.future_cos, stats32.future_sin = stats32.future_cos.float(), stats32.future_sin.float()
    policy = get_policy("expected_attention")
    s64, s32 = policy.scores(stats64), policy.scores(stats32)
    assert s32.dtype == torch.float32
    assert torch.allclose(s32.double(), s64, rtol=1e-4, atol=1e-6)


def test_expected_attention_rejects_too_many_future_positions(stats):
    with pytest.raises(ValueError, match="num_future"):
        get_policy("expected_attention", num_future=17).scores(stats)


# ---- random control and registry ---------------------------------------------------------------------------


def test_random_policy_is_seeded_and_not_routable():
    stats = random_layer_stats()
    torch.manual_seed(123)
    a = get_policy("random", seed=3).scores(stats)
    torch.manual_seed(456)  # the global RNG has no influence
    b = get_policy("random", seed=3).scores(stats)
    assert a.shape == stats.keys.shape[:3]
    assert torch.equal(a, b)
    assert not torch.equal(a, get_policy("random", seed=4).scores(stats))
    other_layer = random_layer_stats(layer_idx=1)
    assert not torch.equal(a, get_policy("random", seed=3).scores(other_layer))
    assert get_policy("random").protected(stats) is None
    assert not get_policy("random").routable


def test_registry():
    assert set(policy_names()) == set(ALL_POLICIES)
    assert set(policy_names(routable_only=True)) == set(ALL_POLICIES) - {"random"}
    with pytest.raises(ValueError, match="unknown policy 'nope'") as info:
        get_policy("nope")
    for name in ALL_POLICIES:
        assert name in str(info.value)
    assert get_policy("streaming", num_sinks=2).num_sinks == 2
    for name in ALL_POLICIES:
        assert get_policy(name).name == name


# ---- keep-set selection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_keep_indices_properties(stats, name):
    policy = get_policy(name)
    b, g, n = stats.keys.shape[:3]
    protected = policy.protected(stats)
    protected = torch.zeros(b, n, dtype=torch.bool) if protected is None else protected & stats.valid
    for budget in BUDGETS:
        kept = keep_indices(policy, stats, budget)
        assert kept.shape == (b, g, min(budget, n))
        assert torch.equal(kept, keep_indices(policy, stats, budget))  # deterministic
        ranks = keep_ranks(policy, stats)
        assert torch.equal(ranks.sort(dim=-1).values, torch.arange(n).expand(b, g, n))  # a permutation
        for bi in range(b):
            n_valid = int(stats.valid[bi].sum())
            for gi in range(g):
                row = kept[bi, gi].tolist()
                assert row == sorted(set(row))  # ascending, no duplicates
                assert all(0 <= j < n for j in row)
                # the first `budget` ranks are exactly the keep set
                assert row == sorted(j for j in range(n) if ranks[bi, gi, j] < budget)
                prot = protected[bi].nonzero().flatten().tolist()
                if budget >= len(prot):
                    assert set(prot) <= set(row)
                if budget <= n_valid:
                    assert all(stats.valid[bi, j] for j in row)  # padding never kept
                else:
                    assert set(torch.nonzero(stats.valid[bi]).flatten().tolist()) <= set(row)
                if budget >= n:
                    assert row == list(range(n))


@pytest.mark.parametrize("name", ["snapkv", "tova", "knorm", "expected_attention", "keydiff", "kvzip"])
def test_keep_indices_are_the_top_scores(stats, name):
    # Without ties, the unprotected part of the keep set is the highest-scoring valid positions.
    policy = get_policy(name)
    scores = policy.scores(stats)
    protected = policy.protected(stats)
    b, g, n = scores.shape
    protected = torch.zeros(b, n, dtype=torch.bool) if protected is None else protected & stats.valid
    budget = 20
    kept = keep_indices(policy, stats, budget)
    for bi in range(b):
        for gi in range(g):
            prot = set(protected[bi].nonzero().flatten().tolist())
            others = [j for j in range(n) if stats.valid[bi, j] and j not in prot]
            others.sort(key=lambda j: -scores[bi, gi, j].item())
            assert set(kept[bi, gi].tolist()) == prot | set(others[: budget - len(prot)])


def test_streaming_keeps_sinks_and_recent(stats):
    kept = keep_indices(get_policy("streaming"), stats, 10)
    g = stats.keys.shape[1]
    recent = list(range(44, 50))
    assert kept[0].tolist() == [[0, 1, 2, 3, *recent]] * g
    assert kept[1].tolist() == [[5, 6, 7, 8, *recent]] * g  # sinks are the first four *real* tokens


def test_too_many_protected_positions_keeps_exactly_budget(stats):
    # snapkv protects the 8-query window; a budget of 3 still keeps exactly 3 positions, all from the window.
    kept = keep_indices(get_policy("snapkv"), stats, 3)
    n = stats.context_length
    assert kept.shape[-1] == 3
    assert bool((kept >= n - stats.window_size).all())
    kept = keep_indices(get_policy("streaming"), stats, 2)  # 4 sinks, budget 2: the two most recent sinks
    assert kept[0].tolist() == [[2, 3]] * stats.keys.shape[1]
    assert kept[1].tolist() == [[7, 8]] * stats.keys.shape[1]


def test_budget_must_be_positive(stats):
    with pytest.raises(ValueError, match="budget"):
        keep_indices(get_policy("knorm"), stats, 0)


def test_keep_order_is_computed_once_per_policy_options(monkeypatch):
    stats = random_layer_stats(heads=6)
    calls = []
    cls = type(get_policy("snapkv"))
    original = cls.scores
    monkeypatch.setattr(cls, "scores", lambda self, st: calls.append(self.kernel_size) or original(self, st))
    first = keep_indices(get_policy("snapkv"), stats, 10)
    again = keep_indices(get_policy("snapkv"), stats, 20)  # a new instance, same options: the order is reused
    other = keep_indices(get_policy("snapkv", kernel_size=1), stats, 10)  # other options: its own order
    assert calls == [5, 1]
    fresh = random_layer_stats(heads=6)  # same tensors, empty memo
    monkeypatch.setattr(cls, "scores", original)
    assert torch.equal(first, keep_indices(get_policy("snapkv"), fresh, 10))
    assert torch.equal(again, keep_indices(get_policy("snapkv"), fresh, 20))
    assert torch.equal(other, keep_indices(get_policy("snapkv", kernel_size=1), fresh, 10))
