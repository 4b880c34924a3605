"""The ragged layout (``polykv_learn.ragged``): a layer whose KV heads keep different numbers of positions holds one
tensor per head and attends per KV head group. It must give what the dense layout (every head padded to the longest,
``CompressedLayer.ragged_heads = False``) and the simulator give, through every cache operation generate uses, while
holding exactly the kept positions (no padding at batch 1, only the rows of a head padded to one another)."""

import pytest
import torch
from greedy_helpers import PAD, assert_same_greedy, greedy_generate, simulator_greedy
from layout_helpers import assert_batch_layout
from model_helpers import left_pad, random_ids
from transformers import AutoModelForCausalLM

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache, CompressedLayer, cache_bytes, padding_bytes
from polykv_learn.capture import CaptureOptions
from polykv_learn.deploy import make_cache
from polykv_learn.models import TINY_CONFIGS, load_model
from polykv_learn.plan import Plan
from polykv_learn.simulator import Simulator

pytestmark = pytest.mark.usefixtures("one_thread")

#: tiny-llama and tiny-qwen3 as shipped (2 KV heads); tiny-mistral and tiny-gemma3 (sliding window 16 on layers 0-2)
#: have one KV head, so here they get 2 (groups of 2 query heads)
MODELS = ("tiny-llama", "tiny-qwen3", "tiny-mistral-g2", "tiny-gemma3-g2")
_built: dict = {}


def tiny(name: str, attn: str = "sdpa"):
    if (name, attn) not in _built:
        if name.endswith("-g2"):
            config = TINY_CONFIGS[name.removesuffix("-g2")]()
            config.num_key_value_heads = 2
            config.polykv_name = config._name_or_path = name
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
        else:
            model = load_model(name, attn_implementation=attn, with_tokenizer=False)[0]
        _built[(name, attn)] = model
    return _built[(name, attn)]


def head_plan(shift: int = 0) -> Plan:
    """Uneven head budgets on every layer (layer 2's head 1 keeps nothing); a sliding layer (window 16) caps every
    head at 15, so there layer 1's heads (72, 24) become (15, 15): dense."""
    budgets = [(36 - shift, 12 + shift), (72, 24), (32, 0), (50 - shift, 30 + shift)]
    return Plan.from_lists(["snapkv", "h2o", "tova", "expected_attention"], [24, 48, 16, 40]).with_head_budgets(budgets)


def dense(monkeypatch) -> None:
    monkeypatch.setattr(CompressedLayer, "ragged_heads", False)


def per_row(model, plans: list[Plan]) -> CompressedCache:
    """An adaptive cache giving batch row ``r`` ``plans[r]`` (statistics for their policies only: no KVzip pass)."""
    return CompressedCache(model, planner=lambda stats: plans, capture=CaptureOptions(accumulate=True))


def kept_bytes(model, plan: Plan, n: int, new: int = 0) -> int:
    """sum over layers and KV heads of min(b_lh, n, W - 1 in a sliding layer) + new, times d * 2 * itemsize."""
    dims = adapter.model_dims(model)
    windows = adapter.sliding_windows(model)
    kept = 0
    for layer, window in enumerate(windows):
        limit = n if window is None else min(n, window - 1)
        kept += sum(min(b, limit) + new for b in plan.layer_head_budgets(layer, dims.num_kv_heads))
    return kept * dims.head_dim * 2 * next(model.parameters()).element_size()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS)
def test_ragged_cache_equals_the_dense_layout_and_the_simulator(name, attn, monkeypatch):
    model = tiny(name, attn)
    context, probe = random_ids(160, seed=1), random_ids(12, seed=2)
    plan = head_plan()
    logits = {}
    for layout in ("ragged", "dense"):
        if layout == "dense":
            dense(monkeypatch)
        cache = make_cache(model, plan)
        with torch.no_grad():
            adapter.forward(model, context, cache)
            ragged = [layer.ragged is not None for layer in cache.layers]
            if layout == "ragged":  # exactly the kept positions, nothing padded
                assert cache_bytes(cache) == kept_bytes(model, plan, 160) and padding_bytes(cache) == 0
            logits[layout] = adapter.forward(model, probe, cache).logits[0].float()
        windows = adapter.sliding_windows(model)
        expected = [w is None or i != 1 for i, w in enumerate(windows)]  # layer 1 of a sliding model is dense
        assert ragged == (expected if layout == "ragged" else [False] * 4)
    torch.testing.assert_close(logits["ragged"], logits["dense"], atol=1e-5, rtol=1e-5)
    simulated = Simulator(model).evaluate(context, probe, [plan]).logits[0]
    assert (simulated - logits["ragged"]).abs().max().item() <= 1e-4
    # greedy generate (32 tokens) through the ragged cache == the simulator's greedy decoding == the dense layout
    monkeypatch.undo()
    generated = greedy_generate(model, context, cache=make_cache(model, plan))
    assert_same_greedy(generated, simulator_greedy(model, context, plan))
    dense(monkeypatch)
    assert greedy_generate(model, context, cache=make_cache(model, plan)) == generated


@pytest.mark.parametrize(
    ("name", "attn"), [("tiny-llama", "sdpa"), ("tiny-llama", "eager"), ("tiny-gemma3-g2", "sdpa")]
)
def test_a_batch_with_its_own_head_budgets_per_row_equals_each_row_alone(name, attn):
    """Batch 2 (left-padded), each row its own head budgets: greedy tokens and logits of every row as alone; each
    head is padded only to its own longest row, and the bytes are exactly that layout."""
    model = tiny(name, attn)
    prompts = [random_ids(150, seed=24), random_ids(90, seed=25)]
    # row 1 moves 20 of head 0's budget to head 1: layer 0 stays ragged (slots 36, 32), layer 3 becomes dense (50, 50)
    plans = [head_plan(), head_plan(shift=20)]
    singles = []
    for prompt, plan in zip(prompts, plans, strict=True):
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False, pad_token_id=PAD,
            cache=make_cache(model, plan), output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        singles.append((out.sequences[0, prompt.shape[1] :], torch.cat(out.logits)))
    ids, mask = left_pad(prompts)
    cache = per_row(model, plans)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=PAD, cache=cache,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    logits = torch.stack(out.logits, dim=1)  # (2, 32, V)
    for r, (tokens, single_logits) in enumerate(singles):
        row = out.sequences[r, ids.shape[1] :]
        assert torch.equal(row[: len(tokens)], tokens), r
        torch.testing.assert_close(logits[r, : len(tokens)], single_logits, atol=1e-4, rtol=1e-5)
    # ragged: layers 0-2 (the sliding model: layer 2 only, its window caps layers 0 and 1 at 15 per head)
    full = adapter.sliding_windows(model)[0] is None
    assert [layer.ragged is not None for layer in cache.layers] == (
        [True, True, True, False] if full else [False, False, True, False]
    )
    if full:  # full attention: every head keeps min(b, n_r) in its row
        assert_batch_layout(cache, 2, new=31, lengths=(150, 90))
        fresh = per_row(model, plans)
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=PAD, cache=fresh)
        assert_batch_layout(fresh, 2, new=0, lengths=(150, 90))
        assert padding_bytes(fresh) > 0  # row 1 keeps fewer in some head than row 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3-g2"])
def test_beam_search_and_batch_operations_on_ragged_layers_equal_the_dense_layout(name, monkeypatch):
    """Beam search (reorder_cache every step), batch_repeat_interleave, batch_select_indices and crop act on every
    head's tensors as on the dense layout's."""
    model = tiny(name)
    prompt, plan = random_ids(120, seed=5), head_plan()
    results = {}
    for layout in ("ragged", "dense"):
        if layout == "dense":
            dense(monkeypatch)
        beams = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, num_beams=3, num_return_sequences=2,
            do_sample=False, pad_token_id=PAD, cache=make_cache(model, plan),
        )  # fmt: skip
        cache = make_cache(model, plan)
        steps = []
        with torch.no_grad():
            adapter.forward(model, prompt, cache)
            assert any(layer.ragged is not None for layer in cache.layers) == (layout == "ragged")
            cache.batch_repeat_interleave(2)
            steps.append(adapter.forward(model, torch.tensor([[5, 6], [7, 8]]), cache).logits)
            cache.batch_select_indices(torch.tensor([1]))
            steps.append(adapter.forward(model, torch.tensor([[9]]), cache).logits)
            cache.crop(-2)  # back to the prompt plus [7]
            assert cache.get_seq_length() == 121
            steps.append(adapter.forward(model, torch.tensor([[8, 9]]), cache).logits)
            with pytest.raises(ValueError, match="crop can remove 0 to 3 tokens after the prefill"):
                cache.crop(-4)
        results[layout] = (beams, steps, cache_bytes(cache))
    assert torch.equal(results["ragged"][0], results["dense"][0])
    for got, ref in zip(results["ragged"][1], results["dense"][1], strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["ragged"][1][2][0, -1], results["ragged"][1][1][0, -1], atol=1e-5, rtol=1e-5)
    new = 3  # prompt + [7, 8, 9] after the crop and the last forward
    assert results["ragged"][2] == kept_bytes(model, plan, 120, new=new) < results["dense"][2]
