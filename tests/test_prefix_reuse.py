"""Reuse of unchanged layers: plans sharing a bias prefix share those layers, with the plain path's logits."""

import pytest
import torch
from model_helpers import TINY_MODELS, random_ids

from polykv_learn import adapter
from polykv_learn.plan import Plan
from polykv_learn.prefix_reuse import prefix_groups
from polykv_learn.simulator import Simulator


def sweep_plans(num_layers: int, n: int) -> list[Plan]:
    """A sensitivity sweep: every layer full except one, which runs a policy at a small budget; plus duplicates."""
    plans = []
    for layer in range(num_layers):
        for policy, budget in (("snapkv", 16), ("knorm", 40)):
            budgets = [n] * num_layers
            budgets[layer] = budget
            policies = ["snapkv"] * layer + [policy] + ["snapkv"] * (num_layers - layer - 1)
            plans.append(Plan.from_lists(policies, budgets))
    plans.append(Plan.uniform("tova", 30, num_layers))
    plans.append(Plan.uniform("tova", 30, num_layers))  # identical to the one before
    plans.append(Plan.uniform("snapkv", n, num_layers))  # keeps everything
    return plans


def test_unshared_top_layer_keeps_every_plan_in_place(tiny_models):
    """Shared lower layers, then a layer where every plan differs (no reuse there): the plans keep their rows."""
    model = tiny_models["tiny-llama"]
    layers = model.config.num_hidden_layers
    sim = Simulator(model)
    capture = sim.capture(random_ids(80, seed=23))
    probe = random_ids(6, seed=24)
    plans = [Plan.from_lists(["knorm"] * layers, [80] * (layers - 1) + [b]) for b in (8, 30, 80, 50)]
    plans += [Plan.from_lists(["snapkv"] * layers, [20] + [80] * (layers - 1))]
    biases = sim.hard_biases(capture, plans)
    groups = prefix_groups(biases)
    assert groups[-1].rep.numel() == len(plans) and not torch.equal(groups[-1].rep, torch.arange(len(plans)))
    with torch.no_grad():
        reused = sim.probe_logits(capture, probe, biases, reuse=True)
        plain = sim.probe_logits(capture, probe, biases, reuse=False)
    assert (reused - plain).abs().max().item() <= 1e-5


def test_prefix_groups_equal_brute_force():
    gen = torch.Generator().manual_seed(0)
    choices = torch.randn(3, 2, 5, generator=gen)  # three possible biases per layer
    picks = torch.randint(0, 2, (9, 4), generator=gen)  # plan x layer -> which bias
    picks[3] = picks[1]
    biases = [choices[picks[:, layer]] for layer in range(4)]  # (P, G, n) each
    groups = prefix_groups(biases)
    for layer, group in enumerate(groups):
        for i in range(9):
            for j in range(9):
                same = all(torch.equal(biases[k][i], biases[k][j]) for k in range(layer + 1))
                assert same == bool(group.inverse[i] == group.inverse[j])
        assert torch.equal(group.inverse[group.rep], torch.arange(group.rep.numel()))
        assert all(int(group.rep[u]) == int(torch.nonzero(group.inverse == u)[0]) for u in range(group.rep.numel()))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_layer_reuse_equals_plain_probe_pass(tiny_models, name):
    model = tiny_models[name]
    layers = model.config.num_hidden_layers
    sim = Simulator(model)
    capture = sim.capture(random_ids(120, seed=21))
    probe = random_ids(9, seed=22)
    plans = sweep_plans(layers, 120)
    biases = sim.hard_biases(capture, plans)
    rows_seen: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape[0]))
        for layer in adapter.decoder_layers(model)
    ]
    try:
        with torch.no_grad():
            reused = sim.probe_logits(capture, probe, biases, reuse=True)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        plain = sim.probe_logits(capture, probe, biases, reuse=False)
    assert reused.shape == plain.shape == (len(plans), 9, model.config.vocab_size)
    assert (reused - plain).abs().max().item() <= 1e-5
    # layer l ran once per distinct bias prefix (prefix_groups equals brute force above)
    assert rows_seen == [group.rep.numel() for group in prefix_groups(biases)]
    if "sliding_attention" not in (getattr(model.config, "layer_types", None) or []):
        # the full prefix, the 2 * l sweep plans branched below it, and tova (a sliding layer keeps its whole
        # window at these budgets, so there the sweep plans coincide and share more rows)
        assert rows_seen == [min(len(plans) - 1, 2 * (layer + 1) + 2) for layer in range(layers)]
