"""The kvzip-global evaluation baseline (KVzip's own allocation): one top-(L*G*B) over the layers' max-normalised
KVzip scores, layer budgets from its counts with the exact total."""

import pytest
import torch
from policy_helpers import random_layer_stats

from polykv_learn.eval.methods import MethodInput, available_methods, default_method_names, kvzip_global_budgets
from polykv_learn.plan import Plan, round_preserving_sum


def layers(num_layers=4, n=50, seed=0):
    return [random_layer_stats(batch=1, pad=0, n=n, seed=seed + i, layer_idx=i) for i in range(num_layers)]


def naive_head_selection(stats, budget):
    """KVzip's per-head selection with Python lists: how many positions of each (layer, KV head) one top-(L*G*B)
    over the normalised scores takes, sinks first."""
    entries = []
    g = stats[0].num_kv_heads
    for layer, s in enumerate(stats):
        score = s.reconstruct_attn[0].tolist()  # (G, n)
        top = max(max(row) for row in score)
        for h in range(g):
            for j in range(s.context_length):
                entries.append((-(2.0 if s.positions[0, j] < 4 else score[h][j] / top), layer, h, j))
    entries.sort()  # by score, then (layer, head, position): the stable order
    counts = [[0] * g for _ in stats]
    for _, layer, h, _ in entries[: len(stats) * g * budget]:
        counts[layer][h] += 1
    return counts


def naive_budgets(stats, budget):
    """The layer budgets: each layer's share of that selection over its G heads, rounded with the exact total."""
    g = stats[0].num_kv_heads
    counts = [sum(c) for c in naive_head_selection(stats, budget)]
    return round_preserving_sum([c / g for c in counts], len(stats) * budget, 1, stats[0].context_length)


@pytest.mark.parametrize("budget", [1, 3, 8, 17, 30, 49])
def test_budgets_follow_the_global_top_k_with_the_exact_total(budget):
    stats = layers()
    budgets = kvzip_global_budgets(stats, budget)
    assert budgets == naive_budgets(stats, budget)
    assert sum(budgets) == 4 * budget and all(1 <= b <= 50 for b in budgets)
    plan = available_methods()["kvzip-global"].plan(MethodInput(stats), budget)
    assert plan.policies == ("kvzip",) * 4 and list(plan.budgets) == budgets and plan.total_budget == 4 * budget


def test_a_flat_layer_takes_the_budget_of_a_peaked_one():
    """After normalisation every position of a flat layer scores 1, a peaked layer's 1 only at its peak: past the
    sinks (4 per head, both layers), the global top-k goes to the flat layer."""
    flat, peaked = layers(num_layers=2, n=20)
    flat.reconstruct_attn = torch.full((1, 3, 20), 0.01, dtype=torch.float64)
    peaked.reconstruct_attn = torch.linspace(0.9, 0.1, 20, dtype=torch.float64).expand(1, 3, 20).clone()
    # B = 6: 2 * 3 * 6 = 36 pairs; 24 sinks, then the flat layer's 12 next (it ties at 1.0, the peaked one < 1 there)
    assert kvzip_global_budgets([flat, peaked], 6) == [8, 4]
    assert kvzip_global_budgets([peaked, flat], 6) == [4, 8]
    assert kvzip_global_budgets([flat, peaked], 20) == [20, 20]  # n <= B: nothing evicted
    assert kvzip_global_budgets([flat, peaked], 25) == [25, 25]


def test_kvzip_global_is_a_default_allocation_method():
    available = available_methods()
    assert available["kvzip-global"].kind == "allocation"
    assert "kvzip-global" in default_method_names(available)


def test_kvzip_scope_switch_sets_the_evaluations_reconstruction_scope():
    """--kvzip_scope: kvzip / kvzip-global score with the chunk scope when asked, an artifact's own scope is kept
    when not, and the results' config names the scope only when it is not "full" (earlier runs stay mergeable)."""
    from types import SimpleNamespace

    from polykv_learn.capture import CaptureOptions
    from polykv_learn.eval.cli import eval_capture
    from polykv_learn.eval.evaluator import EvalSettings
    from polykv_learn.eval.runner import run_config
    from polykv_learn.eval.settings import EvaluateOptions

    table = available_methods()
    zip_methods = [table["kvzip"], table["kvzip-global"]]
    default = eval_capture([], zip_methods)
    assert default.reconstruct and default.reconstruct_scope == "full"
    chunk = eval_capture([], zip_methods, "chunk")
    assert chunk.reconstruct and chunk == CaptureOptions(reconstruct=True, reconstruct_scope="chunk")
    assert not eval_capture([], [table["snapkv"]], "chunk").reconstruct  # no pass: the scope does nothing
    art = SimpleNamespace(
        policies=["snapkv", "kvzip"],
        capture=CaptureOptions(16, 16, chunk=64, reconstruct_scope="chunk", reconstruct_context_chunk=32),
    )
    own = eval_capture([art], [table["kvzip"]])
    assert (own.window, own.reconstruct_scope, own.reconstruct_context_chunk) == (16, "chunk", 32) and own.reconstruct
    assert eval_capture([art], [table["kvzip"]], "full").reconstruct_scope == "full"
    settings = EvalSettings()
    assert run_config(None, settings, zip_methods, default)["capture"] == {"window": 32, "future": 32}
    assert run_config(None, settings, zip_methods, chunk)["capture"] == {
        "window": 32,
        "future": 32,
        "reconstruct_scope": "chunk",
        "reconstruct_context_chunk": 2048,
        "reconstruct_sinks": 4,
    }
    with pytest.raises(ValueError, match=r"^--kvzip_scope must be null or one of 'full', 'chunk', got 'local'$"):
        EvaluateOptions(out="o", kvzip_scope="local").check()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [5, 8, 13, 21, 34])
def test_kvzip_global_heads_keeps_the_exact_totals_and_the_global_selection(seed, budget):
    """Layer budgets are kvzip-global's, each layer's heads sum to G * b_l, and a layer's heads keep what the one
    top-(L*G*B) across layers and heads takes of them whenever that layer's count is a multiple of G (else the
    nearest split of the rounded layer total: no head is off by more than G from the global selection)."""
    stats = [
        random_layer_stats(batch=1, pad=0, kv_heads=2, heads=4, n=40, seed=seed * 10 + i, layer_idx=i) for i in range(3)
    ]
    table = available_methods()
    plan = table["kvzip-global-heads"].plan(MethodInput(stats), budget)
    layer_plan = table["kvzip-global"].plan(MethodInput(stats), budget)
    assert plan.with_head_budgets(None) == layer_plan and plan.total_budget == 3 * budget
    assert plan == layer_plan.with_adakv_heads(stats, alpha=0.0)  # AdaKV's split of each layer, without its floor
    assert all(sum(h) == 2 * b for h, b in zip(plan.head_budgets, plan.budgets, strict=True))
    assert plan.kept_per_head(40) == budget
    selection = naive_head_selection(stats, budget)
    for layer, (heads, chosen) in enumerate(zip(plan.head_budgets, selection, strict=True)):
        if sum(chosen) == 2 * plan.budgets[layer]:
            assert list(heads) == chosen, f"layer {layer}"
        assert all(abs(a - c) <= 2 for a, c in zip(heads, chosen, strict=True))


def test_kvzip_global_heads_matches_the_global_selection_somewhere_uneven():
    """The exact case of the test above occurs, with heads that differ (the check is not vacuous)."""
    hits = 0
    for seed in range(3):
        stats = [
            random_layer_stats(batch=1, pad=0, kv_heads=2, heads=4, n=40, seed=seed * 10 + i, layer_idx=i)
            for i in range(3)
        ]
        for budget in (5, 8, 13, 21, 34):
            plan = available_methods()["kvzip-global-heads"].plan(MethodInput(stats), budget)
            selection = naive_head_selection(stats, budget)
            hits += sum(
                sum(c) == 2 * b and len(set(c)) > 1 and list(h) == c
                for h, c, b in zip(plan.head_budgets, selection, plan.budgets, strict=True)
            )
    assert hits >= 3


def test_kvzip_global_heads_keeps_a_short_context_and_is_a_default():
    stats = layers(n=30)
    available = available_methods()
    assert available["kvzip-global-heads"].plan(MethodInput(stats), 30) == Plan.uniform("kvzip", 30, 4)
    assert available["kvzip-global-heads"].kind == "allocation"
    assert "kvzip-global-heads" in default_method_names(available)


def test_kvzip_global_heads_forks_batched_equal_one_at_a_time_with_empty_heads():
    """Through the evaluator on tiny-llama: at B = 2 some KV heads keep nothing (the sinks go to the first head),
    and the batched forks still give every row what its fork gives alone; bytes equal uniform kvzip's (ragged)."""
    from eval_helpers import batched_equals_single

    from polykv_learn.capture import CaptureOptions

    capture = CaptureOptions(window=16, future=16, reconstruct=True)
    batched = batched_equals_single(["kvzip", "kvzip-global-heads"], capture, (2, 24))
    assert any(0 in h for h in batched.plans["kvzip-global-heads"][2].head_budgets)
    heads = {r["budget"]: r for r in batched.records if r["method"] == "kvzip-global-heads"}
    uniform = {r["budget"]: r for r in batched.records if r["method"] == "kvzip"}
    assert all(heads[b]["kv_bytes"] == uniform[b]["kv_bytes"] and heads[b]["kept"] == b for b in (2, 24))
