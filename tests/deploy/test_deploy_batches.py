"""Batches in deployment (issue 14): every row of a left-padded batch is compressed exactly as if it ran alone
(its own adaptive plan from its own features and real length, its own keep sets), padding is never visible, the
memory is what the padded layout allocates, and a cache serves one generate call."""

import pytest
import torch
from artifact_helpers import make_artifact
from model_helpers import TINY_MODELS, left_pad, model_for, random_ids

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache, cache_bytes, row_stats
from polykv_learn.deploy import compress, make_cache
from polykv_learn.deploy.artifact import read_artifact, write_artifact
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.plan import Plan

PAD = 2  # pad = eos of SmolLM2 and of the tiny models
BUDGET = 32
NEW_TOKENS = 8
POLICIES = ("streaming", "snapkv", "h2o", "tova", "expected_attention")
LENGTHS = (150, 90, 55, 20)  # the last one is shorter than the budget: it keeps everything


pytestmark = pytest.mark.usefixtures("one_thread")


def routed_artifact(directory, model):
    """A tiny artifact with a constructed linear router: policy ``k`` wins where ``x = 3 depth + 2 (log n - 4.5)``
    is nearest to ``k``, so layers and rows of different real lengths get different policies (a random router
    mostly picks one policy everywhere); budgets from a random allocator (non-uniform, feature-dependent)."""
    path = make_artifact(directory, model, policies=POLICIES, random_allocator=True)
    config, tensors = read_artifact(path)
    names = config["feature_names"]
    direction = torch.zeros(len(names))
    direction[names.index("depth")], direction[names.index("log_n")] = 3.0, 2.0
    k = torch.arange(len(POLICIES), dtype=torch.float32)
    tensors = {key: v for key, v in tensors.items() if not key.startswith("router.")}
    tensors["router.net.0.weight"] = k[:, None] * direction[None, :]  # (P, F): logit_k = k x - k^2 / 2
    tensors["router.net.0.bias"] = -9.0 * k - k**2 / 2
    config = {key: v for key, v in config.items() if key != "format"}
    config["router"] = {**config["router"], "num_hidden_layers": 0}
    return write_artifact(path, config, tensors)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("batch_art")
    return {name: routed_artifact(root / name, tiny_models[name]) for name in TINY_MODELS}


def prompts_of(lengths, seed=40):
    return [random_ids(n, seed=seed + n) for n in lengths]


def greedy(model, ids, mask, new_tokens=NEW_TOKENS, **kwargs):
    """Greedy generate -> new tokens (batch, T) and the logits of every step (batch, T, V)."""
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


def alone(model, prompt, cache=None, new_tokens=NEW_TOKENS):
    """One prompt by itself -> (tokens list, logits (T, V))."""
    kwargs = {} if cache is None else {"cache": cache}
    tokens, logits = greedy(model, prompt, torch.ones_like(prompt), new_tokens, **kwargs)
    return tokens[0].tolist(), logits[0]


def assert_rows_equal_singles(tokens, logits, singles):
    """Row ``i`` of a batch's greedy tokens/logits equals prompt ``i`` alone (tokens exactly, logits to 1e-4 plus
    1e-5 relative: the float32 rounding of a padded batch's matmuls differs by CPU, up to 1.2e-4 on SmolLM2's logits
    of about 10 on an AMD EPYC); after an alone run stopped at EOS the batch row only pads."""
    for i, (single_tokens, single_logits) in enumerate(singles):
        row = tokens[i].tolist()
        assert row[: len(single_tokens)] == single_tokens, f"row {i}: batch {row} vs alone {single_tokens}"
        assert all(t == PAD for t in row[len(single_tokens) :])
        torch.testing.assert_close(logits[i, : len(single_tokens)], single_logits, atol=1e-4, rtol=1e-5)


def assert_layout(cache, plans, lengths):
    """Each layer holds every row in max_r min(b_rl, n_r) slots (a sliding layer: at most W - 1): the row's kept real
    keys at the end, zero padding slots before them, never visible; cache_bytes is exactly those allocated tensors."""
    dims = adapter.model_dims(cache.model)
    windows = adapter.sliding_windows(cache.model)
    n_pad = max(lengths)
    total = 0
    for i, layer in enumerate(cache.layers):
        kept = [p.effective_budgets(n, windows)[i] for p, n in zip(plans, lengths, strict=True)]
        slots = max(kept)
        assert layer.keys.shape == (len(plans), dims.num_kv_heads, slots + layer.logical_length - n_pad, dims.head_dim)
        if layer.context_visible is None:  # only when nothing could go: every row whole, no padding slot to drop
            assert all(k == n for k, n in zip(kept, lengths, strict=True)) and slots == n_pad
        else:
            for r, k in enumerate(kept):
                visible = layer.context_visible[r]  # (G, slots)
                assert visible[:, slots - k :].all() and not visible[:, : slots - k].any(), (i, r)
                assert not layer.keys[r, :, : slots - k].any() and not layer.values[r, :, : slots - k].any()
        total += 2 * layer.keys.numel() * layer.keys.element_size()
    assert cache_bytes(cache) == total


# --- adaptive batches == each prompt alone ----------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_adaptive_batch_rows_equal_each_prompt_alone(tiny_models, eager_models, artifacts, name, attn):
    model = model_for(name, attn, tiny_models, eager_models)
    polykv = PolyKV.from_pretrained(artifacts[name])
    by_length = dict(zip(LENGTHS, prompts_of(LENGTHS), strict=True))
    singles, plans = {}, {}
    for n, prompt in by_length.items():
        cache = polykv.make_cache(model, BUDGET)
        singles[n] = alone(model, prompt, cache)
        plans[n] = cache.applied_plan
        assert polykv.plan_for(model, prompt[0], BUDGET) == plans[n]
    assert len(set(plans.values())) == len(LENGTHS), "rows must get different plans, or the test cannot fail"
    assert len({p.policies for p in plans.values()}) > 1 and plans[20] == Plan.from_lists(plans[20].policies, [32] * 4)
    for lengths in ((90, 150), (55, 150, 20)):  # batches of 2 and 3, the longest row not first
        ids, mask = left_pad([by_length[n] for n in lengths])
        cache = polykv.make_cache(model, BUDGET)
        tokens, logits = greedy(model, ids, mask, cache=cache)
        assert_rows_equal_singles(tokens, logits, [singles[n] for n in lengths])
        assert cache.applied_plans == [plans[n] for n in lengths]
        assert polykv.plan_for(model, ids, BUDGET, attention_mask=mask) == cache.applied_plans
        assert_layout(cache, cache.applied_plans, lengths)
        with pytest.raises(RuntimeError, match=rf"compressed a batch of {len(lengths)} rows with different plans"):
            cache.applied_plan  # noqa: B018
    # inside apply: a fresh cache per generate call, batched or not
    ids, mask = left_pad([by_length[n] for n in (90, 150)])
    with polykv.apply(model, budget=BUDGET):
        tokens, logits = greedy(model, ids, mask)
        again = alone(model, by_length[55])
    assert_rows_equal_singles(tokens, logits, [singles[90], singles[150]])
    assert again[0] == singles[55][0]


def test_adaptive_beam_search_on_a_batch_equals_each_prompt_alone(tiny_models, artifacts):
    """Beam search expands every row to its beams before the prefill and reorders rows each step: each beam keeps
    its prompt's plan and mask."""
    model = tiny_models["tiny-llama"]
    polykv = PolyKV.from_pretrained(artifacts["tiny-llama"])
    prompts = prompts_of((90, 150))
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=PAD)
    singles, plans = [], []
    for prompt in prompts:
        cache = polykv.make_cache(model, BUDGET)
        singles.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache, **kwargs))
        plans.append(cache.applied_plan)  # one prompt's 3 beams: one plan
        assert cache.applied_plans == [plans[-1]] * 3
    ids, mask = left_pad(prompts)
    cache = polykv.make_cache(model, BUDGET)
    out = model.generate(ids, attention_mask=mask, cache=cache, **kwargs)
    for i, (prompt, single) in enumerate(zip(prompts, singles, strict=True)):
        assert out[i, ids.shape[1] :].tolist() == single[0, prompt.shape[1] :].tolist()
    assert plans[0] != plans[1] and cache.applied_plans == [plans[0]] * 3 + [plans[1]] * 3


def prefill(model, cache, ids, mask):
    with torch.no_grad():
        adapter.forward(model, ids, cache, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_adaptive_plans_from_layer_summaries_equal_those_from_every_layers_statistics(tiny_models, artifacts, name):
    """An adaptive cache plans from each layer's summary, taken as that layer's prefill ends (its statistics go
    then): the plans of every layer's whole statistics (plan_for_stats, row by row) and the same keep sets."""
    model = tiny_models[name]
    polykv = PolyKV.from_pretrained(artifacts[name])
    seen, h2o = set(), 0
    for lengths in ((150, 90, 55), (90, 150)):
        ids, mask = left_pad(prompts_of(lengths, seed=11))
        for budget in (8, 32, 100):  # 100 keeps the rows of 90 and 55 whole
            capture = CompressedCache(model, capture=polykv.capture)
            prefill(model, capture, ids, mask)
            stats = capture.layer_stats
            expected = [polykv.plan_for_stats([row_stats(s, r) for s in stats], budget) for r in range(len(lengths))]
            cache = polykv.make_cache(model, budget)
            prefill(model, cache, ids, mask)
            assert cache.applied_plans == expected, (lengths, budget)
            capture.compress(expected)
            for got, ref in zip(cache.layers, capture.layers, strict=True):
                assert torch.equal(got.keys, ref.keys) and torch.equal(got.values, ref.values)
                assert (got.context_visible is None) == (ref.context_visible is None)
                assert got.context_visible is None or torch.equal(got.context_visible, ref.context_visible)
            seen.update(expected)
            # rows evicted with h2o: their layer's accumulated attention was computed for them only
            rows = zip(expected, lengths, strict=True)
            h2o += sum(p.policies[i] == "h2o" and p.budgets[i] < n for p, n in rows for i in range(4))
    assert len(seen) >= 8 and len({p.policies for p in seen}) > 1 and h2o > 0  # plans differ by row, length, budget


def test_planner_may_return_one_plan_for_every_row_or_one_per_row(tiny_models):
    model = tiny_models["tiny-llama"]
    prompts = prompts_of((150, 90, 55))
    ids, mask = left_pad(prompts)
    shared = Plan.from_lists(["snapkv", "h2o", "streaming", "expected_attention"], [24, 100, 16, 40])
    per_row = [Plan.uniform("tova", 12, 4), shared, Plan.uniform("knorm", 60, 4)]
    seen = []

    def planner(stats):
        seen.append([(s.context_length, tuple(row_stats(s, 1).positions.shape)) for s in stats])
        return shared

    cache = make_cache(model, planner=planner)
    tokens, logits = greedy(model, ids, mask, cache=cache)
    assert seen == [[(150, (1, 90))] * 4]  # batched statistics; row_stats cuts a row to its real tokens
    assert cache.applied_plan == shared and cache.applied_plans == [shared] * 3
    with compress(model, shared):  # one plan for every row == the fixed plan == each prompt alone
        fixed = greedy(model, ids, mask)
        singles = [alone(model, p) for p in prompts]
    assert torch.equal(tokens, fixed[0])
    assert_rows_equal_singles(tokens, logits, singles)
    assert_layout(cache, [shared] * 3, (150, 90, 55))

    cache = make_cache(model, planner=lambda stats: per_row)
    tokens, logits = greedy(model, ids, mask, cache=cache)
    singles = []
    for prompt, plan in zip(prompts, per_row, strict=True):
        with compress(model, plan):
            singles.append(alone(model, prompt))
    assert_rows_equal_singles(tokens, logits, singles)
    assert cache.applied_plans == per_row

    with pytest.raises(ValueError, match="got 2 plans for a batch of 3 rows; give one Plan"):
        greedy(model, ids, mask, cache=make_cache(model, planner=lambda stats: per_row[:2]))
    with pytest.raises(TypeError, match="a plan must be a Plan or a list of Plans"):
        greedy(model, ids, mask, cache=make_cache(model, planner=lambda stats: {"plan": shared}))


# --- fixed plans and static mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "attn"), [("tiny-llama", "eager"), ("tiny-mistral", "sdpa")])
def test_static_mode_and_fixed_plans_on_a_batch_of_three_equal_one_by_one(
    tiny_models, eager_models, artifacts, name, attn
):
    model = model_for(name, attn, tiny_models, eager_models)
    polykv = PolyKV.from_pretrained(artifacts[name])
    lengths = (90, 150, 20)
    prompts = prompts_of(lengths, seed=7)
    ids, mask = left_pad(prompts)
    static = polykv.static_plan(BUDGET)
    mixed = Plan.from_lists(["h2o", "streaming", "expected_attention", "snapkv"], [12, 120, 40, 20])
    for plan, factory in ((static, lambda: polykv.make_cache(model, BUDGET, mode="static")), (mixed, None)):
        singles = []
        with compress(model, plan):
            singles = [alone(model, p) for p in prompts]
        cache = factory() if factory is not None else make_cache(model, plan)
        tokens, logits = greedy(model, ids, mask, cache=cache)
        assert_rows_equal_singles(tokens, logits, singles)
        assert cache.applied_plan == plan and cache.applied_plans == [plan] * 3
        assert_layout(cache, [plan] * 3, lengths)


def test_cache_bytes_of_a_batch_count_the_padding_slots(tiny_models):
    """Rows keeping 40 and 20 positions in a layer: the layer allocates 2 x 40 slots (20 of them padding)."""
    model = tiny_models["tiny-llama"]
    dims = adapter.model_dims(model)
    ids, mask = left_pad(prompts_of((150, 20)))
    plans = [Plan.uniform("snapkv", 40, 4), Plan.uniform("snapkv", 40, 4)]
    cache = make_cache(model, planner=lambda stats: plans)
    with torch.no_grad():
        adapter.forward(model, ids, cache, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    per_slot = dims.num_kv_heads * dims.head_dim * 2 * 4  # K and V, float32
    assert cache_bytes(cache) == dims.num_layers * 2 * 40 * per_slot
    assert all(int(layer.context_visible[1].sum()) == dims.num_kv_heads * 20 for layer in cache.layers)


# --- one cache, one generate call --------------------------------------------------------------------------------
def test_a_cache_used_for_a_second_generate_call_raises(tiny_models, artifacts):
    model = tiny_models["tiny-llama"]
    polykv = PolyKV.from_pretrained(artifacts["tiny-llama"])
    prompt = prompts_of((120,))[0]
    makers = (
        lambda: polykv.make_cache(model, BUDGET),
        lambda: polykv.make_cache(model, BUDGET, mode="static"),
        lambda: make_cache(model, Plan.uniform("snapkv", 16, 4)),
    )
    message = (
        "this CompressedCache was already used for a prefill of 120 tokens; make a new one per generate call "
        "(polykv.make_cache)"
    )
    for make in makers:
        cache = make()
        first = model.generate(prompt, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        length = cache.get_seq_length()
        with pytest.raises(ValueError) as info:
            model.generate(prompt, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        assert str(info.value) == message
        with pytest.raises(ValueError, match="already used for a prefill of 120 tokens"):  # continuing, too
            model.generate(first, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        assert cache.get_seq_length() == length  # refused before any forward
        cache.reset()  # an emptied cache takes a new prefill
        again = model.generate(prompt, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        assert torch.equal(again, first)
    # apply / compress make a fresh cache per call: repeated calls in one block are fine and identical
    with polykv.apply(model, budget=BUDGET):
        calls = [model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=PAD) for _ in range(2)]
    assert torch.equal(calls[0], calls[1])
    # a direct forward after the prefill still continues the sequence (what the evaluation's forks do)
    cache = make_cache(model, Plan.uniform("snapkv", 16, 4))
    with torch.no_grad():
        adapter.forward(model, prompt, cache)
        adapter.forward(model, random_ids(3, seed=9), cache)
    assert cache.get_seq_length() == 123


# --- bad input ---------------------------------------------------------------------------------------------------
def test_right_padding_and_bad_masks_are_refused(tiny_models, artifacts):
    model = tiny_models["tiny-llama"]
    polykv = PolyKV.from_pretrained(artifacts["tiny-llama"])
    ids, mask = left_pad(prompts_of((60, 30)))
    right = torch.zeros_like(mask)
    right[0], right[1, :30] = 1, 1
    with pytest.raises(ValueError, match="row 1 of attention_mask has padding after a token; pad on the left"):
        polykv.plan_for(model, ids, BUDGET, attention_mask=right)
    with pytest.raises(ValueError, match="row 0 of attention_mask has no token"):
        polykv.plan_for(model, ids, BUDGET, attention_mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 60\), got \(60,\)"):
        polykv.plan_for(model, ids, BUDGET, attention_mask=mask[0])
    with pytest.raises(ValueError, match=r"input_ids must be a tensor of shape \(n,\) or \(batch, n\)"):
        polykv.plan_for(model, ids[None], BUDGET)
    cache = polykv.make_cache(model, BUDGET)
    with pytest.raises(ValueError, match="row 1 of the batch has padding after a real token; .*needs left padding"):
        with torch.no_grad():
            adapter.forward(model, ids, cache, attention_mask=right)
    capture = CompressedCache(model, capture=polykv.capture)
    with torch.no_grad():
        adapter.forward(model, ids, capture, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with pytest.raises(ValueError, match="features takes the statistics of one sequence, got a batch of 2"):
        polykv.features(capture.layer_stats, BUDGET)
    with pytest.raises(ValueError, match="plan_for_stats takes the statistics of one sequence, got a batch of 2"):
        polykv.plan_for_stats(capture.layer_stats, BUDGET)
    # one row cut from the batch plans like that prompt alone
    row = [row_stats(s, 1) for s in capture.layer_stats]
    assert row[0].context_length == 30 and bool(row[0].valid.all())
    assert polykv.plan_for_stats(row, BUDGET) == polykv.plan_for(model, ids[1, 30:], BUDGET)


# --- SmolLM2 ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_adaptive_batch_equals_each_prompt_alone(smollm2):
    model, tokenizer = smollm2
    polykv = PolyKV.from_pretrained("checkpoints/smollm2-135m")
    facts = " ".join(
        f"Item {i} is in box {(i * 7) % 101}, by a {('red', 'blue', 'green')[i % 3]} lamp." for i in range(90)
    )
    text = tokenizer(facts + " So the item in box 14 is item", return_tensors="pt").input_ids
    prompts = [torch.cat([text[:, : n - 10], text[:, -10:]], dim=1) for n in (180, 320)]
    singles, plans = [], []
    for prompt in prompts:
        cache = polykv.make_cache(model, 64)
        singles.append(alone(model, prompt, cache))
        plans.append(cache.applied_plan)
    assert plans[0] != plans[1]
    ids, mask = left_pad(prompts)
    cache = polykv.make_cache(model, 64)
    tokens, logits = greedy(model, ids, mask, cache=cache)
    assert_rows_equal_singles(tokens, logits, singles)
    assert cache.applied_plans == plans
