"""ForkBatchCache: many compressed forks of one prefill decoded as one batch, attention per group of rows, must
give every row exactly what its own compressed cache gives alone (in whatever groups, with rows leaving)."""

import pytest
import torch
from model_helpers import random_ids

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache
from polykv_learn.capture import CaptureOptions
from polykv_learn.eval.fork_batch import ForkBatchCache, fork_of
from polykv_learn.plan import Plan

N = 96  # context tokens


def plans_for(layers):
    """Plans of different sizes and shapes, one keeping every position of some layers, one with head budgets
    (tiny-llama's 2 KV heads: one head keeps 36 or all, the other 4 or none)."""
    policies = ["snapkv" if i % 2 else "streaming" for i in range(layers)]
    mixed = Plan.from_lists(policies, [N if i == 0 else 12 for i in range(layers)])
    heads = Plan.uniform("tova", 20, layers).with_head_budgets([(36, 4) if i % 2 else (40, 0) for i in range(layers)])
    return [
        Plan.uniform("snapkv", 16, layers),
        Plan.uniform("streaming", 40, layers),
        Plan.uniform("h2o", 8, layers),
        heads,
        mixed,
        Plan.uniform("knorm", 64, layers),
    ]


@pytest.fixture(scope="module")
def setup(tiny_models):
    model = tiny_models["tiny-llama"]
    ids = random_ids(N, seed=3, vocab=model.config.vocab_size)
    shared = CompressedCache(model, capture=CaptureOptions(window=8, future=8, accumulate=True))
    with torch.no_grad():
        adapter.forward(model, ids, shared)
    return model, shared


def compressed(model, shared, plans):
    forks = []
    for plan in plans:
        fork = fork_of(shared, model)
        fork.compress(plan)
        forks.append(fork)
    return forks


@pytest.mark.parametrize("group_size,reserve", [(1, 16), (2, 0), (3, 5), (8, 16)])
@torch.no_grad()
def test_batch_equals_each_fork_alone_as_rows_leave(setup, group_size, reserve):
    model, shared = setup
    plans = plans_for(len(shared.layers))
    tail = random_ids(6, seed=4, vocab=model.config.vocab_size)
    steps = random_ids(5, seed=5, vocab=model.config.vocab_size)[0]
    # alone: each fork, fed the tail then the steps one token at a time
    alone = []
    for fork in compressed(model, shared, plans):
        logits = [adapter.forward(model, tail, fork).logits[0, -1]]
        for t in steps:
            logits.append(adapter.forward(model, t.view(1, 1), fork).logits[0, -1])
        alone.append(torch.stack(logits))  # (1 + steps, V)
    batch = ForkBatchCache(model, compressed(model, shared, plans), group_size, reserve)
    out = adapter.forward(model, tail.expand(len(plans), -1), batch).logits[:, -1]  # (P, V)
    for r in range(len(plans)):
        torch.testing.assert_close(out[r], alone[r][0], rtol=1e-4, atol=1e-4)
    live = list(range(len(plans)))
    leave_after = {0: [1], 2: [0, 3]}  # step -> batch rows (positions among the live ones) that leave then
    for step, t in enumerate(steps):
        if step in leave_after:
            keep = [i for i in range(len(live)) if i not in leave_after[step]]
            batch.keep_rows(keep)
            live = [live[i] for i in keep]
        out = adapter.forward(model, t.view(1, 1).expand(len(live), 1), batch).logits[:, -1]
        assert batch.rows == len(live) == out.shape[0]
        for i, r in enumerate(live):
            torch.testing.assert_close(out[i], alone[r][step + 1], rtol=1e-4, atol=1e-4)
    assert live == [2, 3, 5]


@torch.no_grad()
def test_rewind_forgets_appended_tokens(setup):
    model, shared = setup
    plans = plans_for(len(shared.layers))[:3]
    tail = random_ids(4, seed=6, vocab=model.config.vocab_size)
    answer = random_ids(3, seed=7, vocab=model.config.vocab_size)
    step = random_ids(1, seed=8, vocab=model.config.vocab_size)
    a = ForkBatchCache(model, compressed(model, shared, plans), 2, reserve=8)
    adapter.forward(model, torch.cat([tail, answer], 1).expand(3, -1), a)
    a.rewind(answer.shape[1])
    assert a.get_seq_length() == N + tail.shape[1]
    b = ForkBatchCache(model, compressed(model, shared, plans), 2, reserve=8)
    adapter.forward(model, tail.expand(3, -1), b)
    torch.testing.assert_close(
        adapter.forward(model, step.expand(3, -1), a).logits, adapter.forward(model, step.expand(3, -1), b).logits
    )
    with pytest.raises(ValueError, match="cannot rewind 9 tokens: only 5 were appended"):
        a.rewind(9)


def test_bad_arguments_fail_clearly(setup):
    model, shared = setup
    forks = compressed(model, shared, plans_for(len(shared.layers))[:3])
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        ForkBatchCache(model, forks, 0, 4)
    with pytest.raises(ValueError, match="no forks"):
        ForkBatchCache(model, [], 2, 4)
    batch = ForkBatchCache(model, forks, 2, 4)
    for keep in ([], [1, 0], [0, 0], [3], [-1]):
        with pytest.raises(ValueError, match=r"keep must be distinct increasing rows in \[0, 3\)"):
            batch.keep_rows(keep)
    grown = fork_of(shared, model)
    with torch.no_grad():
        adapter.forward(model, random_ids(2, seed=9, vocab=model.config.vocab_size), grown)
    with pytest.raises(ValueError, match="compressed prefills of one context"):
        ForkBatchCache(model, [grown], 2, 4)


@pytest.mark.parametrize("group_size", [1, 4])
@torch.no_grad()
def test_sliding_layers_see_only_their_window_in_the_batch(tiny_models, group_size):
    """tiny-gemma3 (window 16 on layers 0-2), context past the window: every row of the batch equals its fork alone,
    and the uncompressed fork equals the model with transformers' own cache (the window applies to context keys
    too; forks compress sliding layers within their window)."""
    from transformers import DynamicCache

    model = tiny_models["tiny-gemma3"]
    n, vocab = 60, model.config.vocab_size
    ids = random_ids(n, seed=6, vocab=vocab)
    shared = CompressedCache(model, capture=CaptureOptions(window=8, future=8, accumulate=True))
    adapter.forward(model, ids, shared)
    plans = [
        None,
        Plan.uniform("snapkv", 8, 4),
        Plan.from_lists(["streaming", "tova", "h2o", "knorm"], [30, 6, 15, 40]),
        Plan.uniform("h2o", 20, 4),
    ]

    def forks():
        out = []
        for plan in plans:
            fork = fork_of(shared, model)
            if plan is not None:
                fork.compress(plan)
            out.append(fork)
        return out

    assert all(f.layers[0].sliding_window == 16 and f.layers[3].sliding_window is None for f in forks())
    assert int(forks()[2].layers[0].keys.shape[-2]) == 15  # a budget of 30 on a sliding layer keeps its W - 1
    tail, steps = random_ids(5, seed=7, vocab=vocab), random_ids(4, seed=8, vocab=vocab)[0]
    alone = []
    for fork in forks():
        logits = [adapter.forward(model, tail, fork).logits[0, -1]]
        logits += [adapter.forward(model, t.view(1, 1), fork).logits[0, -1] for t in steps]
        alone.append(torch.stack(logits))  # (1 + steps, V)
    stock = DynamicCache(config=model.config)
    adapter.forward(model, ids, stock)
    ref = [adapter.forward(model, tail, stock).logits[0, -1]]
    ref += [adapter.forward(model, t.view(1, 1), stock).logits[0, -1] for t in steps]
    torch.testing.assert_close(alone[0], torch.stack(ref), rtol=1e-4, atol=1e-4)
    batch = ForkBatchCache(model, forks(), group_size, reserve=8)
    out = [adapter.forward(model, tail.expand(len(plans), -1), batch).logits[:, -1]]
    out += [adapter.forward(model, t.view(1, 1).expand(len(plans), 1), batch).logits[:, -1] for t in steps]
    out = torch.stack(out, dim=1)  # (P, 1 + steps, V)
    for r in range(len(plans)):
        torch.testing.assert_close(out[r], alone[r], rtol=1e-4, atol=1e-4)
    assert (alone[1] - alone[0]).abs().max() > 1e-3  # compression changes the logits (the test can tell rows apart)
