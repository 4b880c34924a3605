"""Head-wise budgets in the deployed cache (design §4.3): every KV head of a layer physically keeps its own number
of positions, in its own tensor where the layer's heads differ (``polykv_learn.ragged``); greedy ``generate``
through it equals greedy decoding on the simulator for the same plan, and the cache holds exactly the bytes of its
layout (at batch 1 the kept positions, no padding)."""

import pytest
import torch
from adaptive_helpers import depth_router, left_padded
from greedy_helpers import PAD, assert_batch_equals_singles, assert_same_greedy, greedy_generate, simulator_greedy
from layout_helpers import assert_batch_layout
from model_helpers import TINY_MODELS, left_pad, model_for, random_ids
from transformers import DynamicCache

from polykv_learn import adapter
from polykv_learn.cache import cache_bytes, padding_bytes, row_stats
from polykv_learn.deploy import compress, make_cache
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.layerwise import adakv_planner
from polykv_learn.models import load_model
from polykv_learn.plan import Plan
from polykv_learn.simulator import Simulator

pytestmark = pytest.mark.usefixtures("one_thread")


def skewed(plan: Plan, g: int, shifts=(0, 2, 4, 3)) -> Plan:
    """``plan``'s layers, each layer's ``g * b`` split unevenly among its heads: with ``g = 2``, layer ``l`` moves
    ``b * shifts[l] // 4`` of head 1's share to head 0 (shift 4: head 1 keeps nothing)."""
    if g == 1:
        return plan.with_head_budgets([(b,) for b in plan.budgets])
    assert g == 2
    return plan.with_head_budgets([(b + b * s // 4, b - b * s // 4) for b, s in zip(plan.budgets, shifts, strict=True)])


def head_plans(g: int) -> list[Plan]:
    """Head budgets with g = 2: (24, 24) (72, 24) (32, 0) (70, 10), and (64, 0) (20, 20) (70, 42) (24, 0)."""
    return [
        skewed(Plan.from_lists(["snapkv", "h2o", "streaming", "expected_attention"], [24, 48, 16, 40]), g),
        skewed(Plan.from_lists(["tova", "knorm", "keydiff", "snapkv"], [32, 20, 56, 12]), g, shifts=(4, 0, 1, 4)),
    ]


def expected_bytes(plan: Plan, g: int, d: int, itemsize: int, n: int, new: int = 0) -> int:
    """Bytes of a batch-1 cache under ``plan``: every KV head holds exactly its kept positions and the ``new``
    tokens after them (a layer whose heads differ is ragged, one tensor per head: nothing padded)."""
    kept = sum(min(b, n) + new for layer in range(plan.num_layers) for b in plan.layer_head_budgets(layer, g))
    return kept * d * 2 * itemsize


# --- simulator == real cache -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY_MODELS)
def test_simulator_equals_the_real_headwise_cache(tiny_models, name):
    model = tiny_models[name]
    g = adapter.model_dims(model).num_kv_heads
    context, probe = random_ids(200, seed=1), random_ids(12, seed=2)
    plans = head_plans(g)
    result = Simulator(model).evaluate(context, probe, plans)
    for i, plan in enumerate(plans):
        cache = make_cache(model, plan)
        with torch.no_grad():
            adapter.forward(model, context, cache)
            ref = adapter.forward(model, probe, cache).logits[0].float()
        assert (result.logits[i] - ref).abs().max().item() <= 1e-4, plan


# --- generate == simulator --------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_headwise_generate_equals_simulator_greedy(tiny_models, eager_models, name, attn):
    model = model_for(name, attn, tiny_models, eager_models)
    g = adapter.model_dims(model).num_kv_heads
    prompt = random_ids(160, seed=21)
    capture = Simulator(model).capture(prompt)
    plans = [*head_plans(g), Plan.adakv("snapkv", 20, capture.stats, alpha=0.2)]
    if g > 1:
        plans.append(Plan.adakv_global("tova", 24, capture.stats, alpha=0.1))
    differs = g == 1  # one KV head: head budgets are the layer budget (the plain plan)
    for plan in plans:
        with compress(model, plan):
            generated = greedy_generate(model, prompt)
        assert_same_greedy(generated, simulator_greedy(model, prompt, plan))
        assert greedy_generate(model, prompt, cache=make_cache(model, plan)) == generated
        with compress(model, plan.with_head_budgets(None)):
            differs |= greedy_generate(model, prompt) != generated
    assert differs, "head budgets that move most of a head's share must change the continuation (or nothing is tested)"


# --- memory -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_headwise_cache_bytes_are_the_kept_positions_plus_the_padding(name, dtype):
    model, _ = load_model(name, dtype=dtype, with_tokenizer=False)
    dims = adapter.model_dims(model)
    g, d = dims.num_kv_heads, dims.head_dim
    prompt = random_ids(150, seed=23)
    # g = 2: heads (20, 0) (55, 19) (128, 0) (186, 112): layer 3's head 0 keeps all of the 150 context positions
    plan = skewed(
        Plan.from_lists(["snapkv", "h2o", "streaming", "expected_attention"], [10, 37, 64, 149]), g, (4, 2, 4, 1)
    )
    cache = make_cache(model, plan)
    with torch.no_grad():
        adapter.forward(model, prompt, cache)
    kept = expected_bytes(plan, g, d, dtype.itemsize, 150)
    assert cache_bytes(cache) == kept and padding_bytes(cache) == 0
    ragged = [layer.ragged is not None for layer in cache.layers]
    assert ragged == [len(set(plan.layer_head_budgets(i, g))) > 1 for i in range(4)]
    if g == 2:  # the dense layout would pad (20 + 36 + 128 + 38) more slots
        assert kept == (20 + 74 + 128 + 150 + 112) * d * 2 * dtype.itemsize and all(ragged)
        assert [k.shape[2] for k in cache.layers[1].ragged.keys] == [55, 19]
    # after k new tokens every head holds its slots + k - 1 (the last token is never fed back)
    k = 6
    cache = make_cache(model, plan)
    greedy_generate(model, prompt, new_tokens=k, cache=cache)
    assert cache_bytes(cache) == expected_bytes(plan, g, d, dtype.itemsize, 150, new=k - 1)
    assert padding_bytes(cache) == 0
    # a plain plan has no padding: exactly sum_l b_l positions per head
    plain = make_cache(model, plan.with_head_budgets(None))
    with torch.no_grad():
        adapter.forward(model, prompt, plain)
    assert padding_bytes(plain) == 0 and cache_bytes(plain) == sum(plan.budgets) * g * d * 2 * dtype.itemsize
    assert padding_bytes(DynamicCache(config=model.config)) == 0


# --- batches ----------------------------------------------------------------------------------------------------


def adakv_rows(budget):
    """An adaptive planner: each row its own AdaKV plan from its own statistics."""

    def planner(stats):
        return [Plan.adakv("snapkv", budget, [row_stats(s, r) for s in stats]) for r in range(stats[0].valid.shape[0])]

    return planner


@pytest.mark.parametrize(("name", "attn"), [("tiny-llama", "sdpa"), ("tiny-llama", "eager"), ("tiny-mistral", "sdpa")])
def test_headwise_left_padded_batch_equals_one_by_one(tiny_models, eager_models, name, attn):
    model = model_for(name, attn, tiny_models, eager_models)
    g = adapter.model_dims(model).num_kv_heads
    long, short = random_ids(150, seed=24), random_ids(70, seed=25)
    # the short row (70 tokens) has heads that keep all of it (72 and 70) next to heads that keep little or nothing
    for plan in head_plans(g):
        assert_batch_equals_singles(model, [long, short], 12, plan=plan)
    assert_batch_equals_singles(model, [long, short, random_ids(40, seed=26)], 12, planner=adakv_rows(24))
    # decoding appends to every head: each row's layer holds its slots + the new tokens, padding masked
    ids, mask = left_pad([long, short])
    cache = make_cache(model, planner=adakv_rows(24))
    model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD, cache=cache)
    assert_batch_layout(cache, g, new=4, lengths=(150, 70))


def test_adakv_planner_summarises_each_layer_and_plans_as_plan_adakv(tiny_models):
    """The deployable AdaKV cache (a LayerwisePlanner: each layer's head budgets at the end of its own prefill, its
    statistics dropped then) applies to every row Plan.adakv of the row's own statistics."""
    model = tiny_models["tiny-llama"]
    ids, mask = left_pad([random_ids(150, seed=24), random_ids(70, seed=25), random_ids(20, seed=26)])
    outputs, plans = [], []
    for planner in (adakv_planner("snapkv", 24), adakv_rows(24)):
        cache = make_cache(model, planner=planner)
        outputs.append(
            model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD, cache=cache)
        )
        plans.append(cache.applied_plans)
    assert torch.equal(outputs[0], outputs[1]) and plans[0] == plans[1]
    assert plans[0][2] == Plan.uniform("snapkv", 24, 4)  # 20 tokens: kept whole, no head budgets
    assert plans[0][0].head_budgets is not None
    with pytest.raises(ValueError, match="budget must be a positive integer, got 0"):
        adakv_planner("snapkv", 0)
    with pytest.raises(ValueError, match="unknown policy 'adakv'"):
        adakv_planner("adakv", 8)


def test_a_plan_for_other_kv_heads_is_refused(tiny_models):
    model = tiny_models["tiny-llama"]
    plan = Plan.uniform("snapkv", 8, 4).with_head_budgets([(8, 8, 8)] * 4)
    with pytest.raises(ValueError, match="head budgets for 3 KV heads per layer but the model has 2"):
        make_cache(model, plan)
    with pytest.raises(ValueError, match="head budgets for 3 KV heads per layer but the model has 2"):
        Simulator(model).evaluate(random_ids(20, seed=1), random_ids(3, seed=2), [plan])


# --- PolyKV with head allocation (polykv-heads) ------------------------------------------------------------------
#: the policy the depth router below gives layers 0..3 (round(5 l / 3) of these): streaming, h2o, tova, e.a.
ROUTED = ("streaming", "snapkv", "h2o", "tova", "knorm", "expected_attention")
BY_DEPTH = ("streaming", "h2o", "tova", "expected_attention")


@pytest.fixture(scope="module")
def heads_router(tmp_path_factory, tiny_models) -> PolyKV:
    return depth_router(tmp_path_factory.mktemp("heads") / "tiny", tiny_models["tiny-llama"], ROUTED, 5.0)


def test_polykv_head_allocation_generate_equals_the_simulator_and_holds_its_layout(tiny_models, heads_router):
    """make_cache(..., head_allocation="adakv"): the learned plan, each layer split among its KV heads by AdaKV under
    its routed policy (H2O's accumulated attention included) from keys kept as each layer's prefill ends; greedy
    generate through it equals the simulator under the applied plan, which is plan_for's; its bytes are the kept
    positions of every head, nothing padded (a layer whose heads differ holds one tensor per head)."""
    model = tiny_models["tiny-llama"]
    dims = adapter.model_dims(model)
    prompt, budget = random_ids(160, seed=21), 24
    plan = heads_router.plan_for(model, prompt[0], budget, head_allocation="adakv")
    plain = heads_router.plan_for(model, prompt[0], budget)
    assert plan.with_head_budgets(None) == plain and plain.policies == BY_DEPTH
    assert all(sum(h) == dims.num_kv_heads * b for h, b in zip(plan.head_budgets, plan.budgets, strict=True))
    assert any(len(set(h)) > 1 for h in plan.head_budgets), "the split must be uneven somewhere"
    cache = heads_router.make_cache(model, budget, head_allocation="adakv")
    generated = greedy_generate(model, prompt, new_tokens=20, cache=cache)
    assert cache.applied_plans == [plan]
    assert_same_greedy(generated, simulator_greedy(model, prompt, plan, 20, heads_router.capture))
    with heads_router.apply(model, budget, head_allocation="adakv"):
        assert greedy_generate(model, prompt, new_tokens=20) == generated
    assert greedy_generate(model, prompt, new_tokens=20, cache=heads_router.make_cache(model, budget)) != generated
    cache = heads_router.make_cache(model, budget, head_allocation="adakv")
    with torch.no_grad():
        adapter.forward(model, prompt, cache)
    itemsize = next(model.parameters()).dtype.itemsize
    kept = expected_bytes(plan, dims.num_kv_heads, dims.head_dim, itemsize, 160)
    assert cache_bytes(cache) == kept and padding_bytes(cache) == 0
    assert kept == sum(plan.effective_budgets(160)) * dims.num_kv_heads * dims.head_dim * 2 * itemsize


def test_polykv_head_allocation_gives_every_batch_row_its_own_split(tiny_models, heads_router):
    model = tiny_models["tiny-llama"]
    ids, mask = left_padded((150, 90, 20))  # the 20-token row is kept whole: no head budgets
    cache = heads_router.make_cache(model, 24, head_allocation="adakv")
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD, cache=cache)
    plans = heads_router.plan_for(model, ids, 24, attention_mask=mask, head_allocation="adakv")
    assert cache.applied_plans == plans and plans[0] != plans[1]
    assert plans[2].head_budgets is None and plans[0].head_budgets is not None
    for r in range(2):
        assert plans[r] == heads_router.plan_for(model, ids[r, -int(mask[r].sum()) :], 24, head_allocation="adakv")
    prompts = [random_ids(150, seed=24), random_ids(70, seed=25)]
    factory = lambda: heads_router.make_cache(model, 24, head_allocation="adakv")  # noqa: E731
    assert_batch_equals_singles(model, prompts, 10, cache_factory=factory)


def test_polykv_head_allocation_is_checked_in_one_line(tiny_models, heads_router):
    model = tiny_models["tiny-llama"]
    bad = "head_allocation must be one of none, adakv, learned, got 'global'"
    for call in (
        lambda: heads_router.make_cache(model, 24, head_allocation="global"),
        lambda: heads_router.apply(model, 24, head_allocation="global").__enter__(),
        lambda: heads_router.layerwise_planner(24, head_allocation="global"),
        lambda: heads_router.plan_for(model, random_ids(30, seed=1)[0], 24, head_allocation="global"),
    ):
        with pytest.raises(ValueError, match=bad) as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="head_allocation='adakv' needs mode='adaptive'") as err:
        heads_router.make_cache(model, 24, mode="static", head_allocation="adakv")
    assert "\n" not in str(err.value)
    assert heads_router.make_cache(model, 24, mode="static", head_allocation="none").plan is not None


# --- SmolLM2 ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_adakv_generate_equals_simulator_greedy(smollm2):
    model, tokenizer = smollm2
    text = " ".join(
        f"Item {i} is stored in box {(i * 7) % 101}, next to a {('red', 'blue')[i % 2]} lamp." for i in range(80)
    )
    prompt = tokenizer(text + " To sum up, the item in box 14 is item", return_tensors="pt").input_ids[:, -320:]
    capture = Simulator(model).capture(prompt)
    plan = Plan.adakv("snapkv", 48, capture.stats)
    assert any(len(set(h)) > 1 for h in plan.head_budgets), "AdaKV must share some layer unevenly"
    with compress(model, plan):
        generated = greedy_generate(model, prompt)
    assert_same_greedy(generated, simulator_greedy(model, prompt, plan))
