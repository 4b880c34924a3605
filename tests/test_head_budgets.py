"""Head-wise budgets of a plan (design §2): validation, serialisation, text form, and AdaKV's allocation
(arXiv:2407.11550) per layer and across layers against naive definitions with Python lists."""

from __future__ import annotations

import math

import pytest
import torch
from policy_helpers import random_layer_stats

from polykv_learn import headwise
from polykv_learn.learn.soft_plan import soft_key_bias
from polykv_learn.plan import Plan, round_preserving_sum
from polykv_learn.policies import get_policy, order_positions


def layers(num_layers=4, n=50, seed=0):
    return [random_layer_stats(batch=1, pad=0, n=n, seed=seed + i, layer_idx=i) for i in range(num_layers)]


# --- validation and serialisation --------------------------------------------------------------------------------
def test_head_budgets_are_checked_in_one_line():
    ok = Plan(("snapkv", "tova"), (4, 2), ((8, 0, 4), (2, 2, 2)))
    assert ok.head_budgets == ((8, 0, 4), (2, 2, 2)) and ok.num_kv_heads == 3
    cases = [
        (((8, 0, 4),), "head_budgets has 1 layers but the plan has 2"),
        (((8, 0, 4), (3, 3)), "layer 1 name 2 KV heads, layer 0's 3"),
        (((8, 0, 5), (2, 2, 2)), "layer 0 sum to 13, but 3 KV heads x layer budget 4 = 12"),
        (((8, -1, 5), (2, 2, 2)), "KV head 1 of layer 0 must be an integer >= 0, got -1"),
        (((8, 0.5, 3.5), (2, 2, 2)), "KV head 1 of layer 0 must be an integer >= 0, got 0.5"),
        (((), (2, 2, 2)), "layer 0 must be a non-empty list"),
        ("12", "head_budgets must be one list of KV-head budgets per layer"),
    ]
    for heads, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            Plan(("snapkv", "tova"), (4, 2), heads)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="head budgets for 3 KV heads per layer but the model has 2"):
        ok.check_dims(2, 2)
    with pytest.raises(ValueError, match="plan has 2 layers but the model has 3"):
        ok.check_dims(3, 3)
    ok.check_dims(2, 3)


def test_round_trip_text_and_helpers():
    plan = Plan(("snapkv", "tova"), (4, 2), [[8, 0, 4], torch.tensor([1, 2, 3]).tolist()])
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan.to_dict()["head_budgets"] == [[8, 0, 4], [1, 2, 3]]
    plain = Plan.uniform("snapkv", 4, 2)
    assert plain.to_dict() == {"policies": ["snapkv", "snapkv"], "budgets": [4, 4]}  # no new key
    assert Plan.from_dict(plain.to_dict()) == plain and plain.head_budgets is None
    with pytest.raises(ValueError, match="unknown keys \\['heads'\\]"):
        Plan.from_dict({**plain.to_dict(), "heads": [[1]]})
    assert str(plan).splitlines() == [
        "Plan: 2 layers, total budget 6 (average 3), 3 KV heads each",
        "layer  policy  budget  head budgets",
        "    0  snapkv       4  8 0 4",
        "    1  tova         2  1 2 3",
    ]
    assert "head budgets" not in str(plain)
    assert plan.layer_head_budgets(0, 3) == (8, 0, 4) and plain.layer_head_budgets(1, 3) == (4, 4, 4)
    assert plan.keeps_all(8, layer=0) is False and plan.keeps_all(0) and not plan.keeps_all(1)
    assert plain.keeps_all(4) and not plain.keeps_all(5)
    assert plan.with_head_budgets(None) == Plan(("snapkv", "tova"), (4, 2))


# --- AdaKV ---------------------------------------------------------------------------------------------------------
def _entries(stats, policy_name, floor):
    """Every (head, position) of one layer as (sort key, head, position): the head's first ``floor`` positions of
    its keep order first, then protected, then higher score; ties to the earlier head and its earlier rank."""
    policy = get_policy(policy_name)
    order = order_positions(policy, stats)[0].tolist()  # (G, n)
    score = policy.scores(stats)[0].float().tolist()
    prot = policy.protected(stats)
    prot = [False] * stats.context_length if prot is None else prot[0].tolist()
    out = []
    for h, row in enumerate(order):
        for rank, j in enumerate(row):
            out.append(((-(rank < floor), -prot[j], -score[h][j], h, rank), h, j))
    return out, order


def naive_adakv_heads(stats, policy_name, budget, floor):
    """Per head, the set of positions a flattened top-(G * budget) of the layer keeps."""
    entries, order = _entries(stats, policy_name, floor)
    entries.sort()
    kept = [set() for _ in order]
    for _, h, j in entries[: len(order) * budget]:
        kept[h].add(j)
    return kept, order


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "knorm", "kvzip", "streaming"])
@pytest.mark.parametrize("budget", [1, 4, 9, 20, 49])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_adakv_keeps_the_layer_top_k_with_a_floor_per_head(policy, budget, alpha):
    stats = layers()
    plan = Plan.adakv(policy, budget, stats, alpha=alpha)
    floor = math.floor(alpha * budget)
    assert plan.budgets == (budget,) * 4 and plan.policies == (policy,) * 4
    for layer, s in enumerate(stats):
        heads = plan.head_budgets[layer]
        assert sum(heads) == 3 * budget and min(heads) >= floor and max(heads) <= 50
        kept, order = naive_adakv_heads(s, policy, budget, floor)
        for h, b in enumerate(heads):  # what the head keeps (a prefix of its order) is the layer's top-k
            assert set(order[h][:b]) == kept[h], (layer, h)
    if alpha == 1.0:
        assert all(h == (budget,) * 3 for h in plan.head_budgets)  # the floor is the whole budget: uniform


def test_adakv_keeps_everything_of_a_short_context_and_checks_its_input():
    stats = layers(n=20)
    assert Plan.adakv("snapkv", 20, stats) == Plan.uniform("snapkv", 20, 4)
    plan = Plan.pyramid("snapkv", 10, 4).with_adakv_heads(stats)  # layer 0: 19 (< 20) is shared, not kept whole
    assert plan.budgets == Plan.pyramid("snapkv", 10, 4).budgets
    assert all(sum(h) == 3 * b for h, b in zip(plan.head_budgets, plan.budgets, strict=True))
    assert Plan.uniform("snapkv", 25, 4).with_adakv_heads(stats).head_budgets == ((25, 25, 25),) * 4
    with pytest.raises(ValueError, match="alpha .* must be in \\[0, 1\\], got 1.5"):
        Plan.adakv("snapkv", 8, stats, alpha=1.5)
    with pytest.raises(ValueError, match="got statistics of 3 layers for a plan of 4"):
        Plan.uniform("snapkv", 8, 4).with_adakv_heads(stats[:3])
    batch = [random_layer_stats(batch=2, n=20, seed=i, layer_idx=i) for i in range(4)]
    with pytest.raises(ValueError, match="one sequence without padding, got a batch of 2 rows"):
        Plan.adakv("snapkv", 8, batch)


def test_adakv_gives_a_peaked_head_less_than_a_flat_one():
    """SnapKV scores: a head whose window attention is spread over the context needs more positions than a head
    that looks at one position; AdaKV moves the budget there (the window stays)."""
    stats = layers(num_layers=1, n=40)[0]
    attn = torch.full((1, 6, 8, 40), 1 / 40, dtype=torch.float64)  # flat for every query head
    attn[:, 0:2] = 0.0
    attn[:, 0:2, :, 3] = 1.0  # KV head 0 (query heads 0, 1): everything on position 3
    stats.window_attn = attn
    # 48 positions: the 3 x 8 window positions (protected) first; head 0 then only needs the 5 positions its
    # pooled peak covers (score 0.2); the flat heads tie at 0.025 for the other 19, which go to the earlier head
    assert Plan.adakv("snapkv", 16, [stats], alpha=0.2).head_budgets[0] == (13, 27, 8)


def naive_global(stats, policy_name, budget, alpha):
    """The global variant by its definition: every (layer, head, position), scores divided by the layer's
    largest, each head's first floor(alpha * B) positions first, then protected, then score; the top L*G*B."""
    floor = math.floor(alpha * budget)
    policy = get_policy(policy_name)
    entries = []
    for layer, s in enumerate(stats):
        top = float(policy.scores(s)[0].float().max())
        for key, _, _ in _entries(s, policy_name, floor)[0]:
            first, prot, score, head, rank = key
            entries.append(((first, prot, score / top, layer, head, rank), layer))
    entries.sort()
    g = stats[0].num_kv_heads
    counts = [0] * len(stats)
    for _, layer in entries[: len(stats) * g * budget]:
        counts[layer] += 1
    n = stats[0].context_length
    layer_budgets = round_preserving_sum([c / g for c in counts], len(stats) * budget, max(floor, 1), n)
    heads = []
    for s, b in zip(stats, layer_budgets, strict=True):
        kept, _ = naive_adakv_heads(s, policy_name, b, floor)
        heads.append(tuple(len(k) for k in kept))
    return layer_budgets, heads


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "kvzip", "tova"])
@pytest.mark.parametrize("budget", [1, 6, 17, 40])
def test_adakv_global_follows_one_top_k_over_every_layer_with_the_exact_total(policy, budget):
    stats = layers()
    plan = Plan.adakv_global(policy, budget, stats)
    budgets, heads = naive_global(stats, policy, budget, 0.2)
    assert list(plan.budgets) == budgets and [list(h) for h in plan.head_budgets] == [list(h) for h in heads]
    assert plan.total_budget == 4 * budget
    assert sum(sum(h) for h in plan.head_budgets) == 4 * 3 * budget
    assert min(min(h) for h in plan.head_budgets) >= math.floor(0.2 * budget)


def test_adakv_global_refuses_negative_scores_and_keeps_a_short_context():
    stats = layers(n=30)
    with pytest.raises(ValueError, match="must be >= 0; layer 0 has negative scores"):
        Plan.adakv_global("knorm", 8, stats)
    assert Plan.adakv_global("snapkv", 30, stats) == Plan.uniform("snapkv", 30, 4)


# --- soft plans ----------------------------------------------------------------------------------------------------
def test_soft_head_budgets_sharpen_into_the_hard_head_keep_sets():
    """Training's soft keep weights take (R, G) head budgets; as tau -> 0 the key bias is the hard head mask."""
    gen = torch.Generator().manual_seed(0)
    ranks = torch.stack([torch.randperm(30, generator=gen) for _ in range(2 * 3)]).reshape(2, 3, 30)  # (Pol, G, n)
    heads = torch.tensor([[12.0, 0.0, 6.0], [1.0, 29.0, 30.0]])  # (R, G)
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row 0 policy 0, row 1 policy 1
    bias = soft_key_bias(ranks, probs, heads, tau=1e-3)  # (R, G, n)
    hard = torch.stack([ranks[0] < heads[0, :, None], ranks[1] < heads[1, :, None]])
    assert torch.equal(bias > -1, hard)
    assert torch.equal(
        soft_key_bias(ranks, probs, heads[:, :1].expand(2, 3), 0.5), soft_key_bias(ranks, probs, heads[:, 0], 0.5)
    )


def test_row_keep_positions_cap_a_sliding_layer_and_need_no_order_when_whole():
    """One row of a layer: the order's first ``b_h`` per head (ascending); a sliding layer keeps at most ``W - 1``
    (its last ones when it keeps all it can), and then the keep order is never computed."""
    from polykv_learn.layout import row_keep_positions

    order = torch.tensor([[5, 0, 3, 1, 2, 4], [2, 4, 1, 0, 5, 3]])  # (G=2, n=6), best first
    kept, whole = row_keep_positions((2, 3), 6, None, lambda: order, torch.device("cpu"))
    assert [k.tolist() for k in kept] == [[0, 5], [1, 2, 4]] and not whole

    def no_order():
        raise AssertionError("the keep order is not needed when the row keeps all it can")

    kept, whole = row_keep_positions((9, 6), 6, None, no_order, torch.device("cpu"))
    assert [k.tolist() for k in kept] == [[0, 1, 2, 3, 4, 5]] * 2 and whole
    kept, whole = row_keep_positions((4, 9), 6, 4, no_order, torch.device("cpu"))  # window 4: at most 3, the last
    assert [k.tolist() for k in kept] == [[3, 4, 5]] * 2 and whole
    kept, whole = row_keep_positions((2, 3), 6, 4, lambda: order, torch.device("cpu"))  # 3 = W - 1: whole for head 1
    assert [k.tolist() for k in kept] == [[0, 5], [1, 2, 4]] and not whole


# --- AdaKV's split of any layer plan ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
def test_adakv_split_of_a_layer_plan_keeps_each_layer_total_within_the_floor_and_n(alpha):
    """Each layer's G * b_l shared by AdaKV under the layer's own policy (what polykv-heads applies to the learned
    plan): exact totals, heads in [floor(alpha * b_l), n], each head's share a prefix of its keep order that is
    the layer's flattened top-k; a layer whose budget covers the context keeps it all."""
    stats = layers()  # 4 layers, 3 KV heads, n = 50
    plan = Plan.from_lists(["snapkv", "h2o", "knorm", "tova"], [3, 17, 49, 60])
    split = plan.with_adakv_heads(stats, alpha)
    assert split.policies == plan.policies and split.budgets == plan.budgets
    for layer, (heads, b) in enumerate(zip(split.head_budgets[:3], plan.budgets, strict=False)):
        floor = math.floor(alpha * b)
        assert sum(heads) == 3 * b and min(heads) >= floor and max(heads) <= 50, (layer, heads)
        kept, order = naive_adakv_heads(stats[layer], plan.policies[layer], b, floor)
        assert [set(order[h][:c]) for h, c in enumerate(heads)] == kept, layer
    assert split.head_budgets[3] == (60, 60, 60)  # 60 >= n: the whole layer
    assert split.kept_per_head(50) == sum(min(b, 50) for b in plan.budgets) / 4
    # the counts come from headwise.split_heads over the layers' ordered keys, whoever holds them
    keys = {
        (i, p): headwise.ordered_keys(get_policy(p), s)
        for i, (s, p) in enumerate(zip(stats, plan.policies, strict=True))
    }
    from_keys = plan.with_adakv_heads_from_keys(lambda i, p: keys[(i, p)], 50, 3, alpha)
    assert from_keys == split


def test_adakv_split_with_one_kv_head_is_the_plan_and_of_uniform_snapkv_is_plan_adakv():
    one = [random_layer_stats(batch=1, pad=0, kv_heads=1, heads=2, n=50, seed=i, layer_idx=i) for i in range(4)]
    plan = Plan.from_lists(["snapkv", "h2o", "knorm", "tova"], [3, 17, 49, 60])
    assert plan.with_adakv_heads(one).head_budgets == tuple((b,) for b in plan.budgets)
    stats = layers()
    for budget, alpha in ((5, 0.2), (16, 0.0), (33, 0.5)):
        split = Plan.uniform("snapkv", budget, 4).with_adakv_heads(stats, alpha)
        assert split == Plan.adakv("snapkv", budget, stats, alpha)
    with pytest.raises(ValueError, match="alpha .* must be in \\[0, 1\\], got -0.1"):
        plan.with_adakv_heads(stats, alpha=-0.1)
