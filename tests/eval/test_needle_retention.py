"""Needle retention (issue #19): where the gold answer sits in the compressed prompt, the exact share of it a plan
keeps (== what the real compressed cache keeps), the evaluator's records, and shards merging to the whole."""

import pytest
import torch
from eval_helpers import make_samples
from model_helpers import random_ids
from policy_helpers import random_layer_stats

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache
from polykv_learn.capture import CaptureOptions
from polykv_learn.eval.evaluator import EvalSettings, Evaluator, prompt_pieces
from polykv_learn.eval.methods import available_methods, resolve_methods
from polykv_learn.eval.report import plot_needle_retention, results_markdown
from polykv_learn.eval.results import build_results, merge_results
from polykv_learn.eval.retention import kept_positions, needle_positions, plan_retention
from polykv_learn.eval.runner import run_evaluation
from polykv_learn.models import load_model
from polykv_learn.plan import Plan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def layers(num_layers=3, n=60):
    return [random_layer_stats(batch=1, pad=0, n=n, seed=i, layer_idx=i) for i in range(num_layers)]


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_needle_positions_are_the_answer_tokens_of_the_prompt(tiny, query_aware, chat):
    _, tok = tiny
    sample = make_samples(1)[0]
    settings = EvalSettings(query_aware=query_aware, chat=chat)
    prompt = prompt_pieces(tok, settings, sample).prompt
    pos = needle_positions(tok, sample, chat, None)
    assert pos == list(range(pos[0], pos[-1] + 1))  # one occurrence: contiguous tokens
    text = tok.decode([prompt[i] for i in pos])
    assert sample["answers"][0] in text and "pass" not in text  # the key's tokens, not its neighbours
    # the tokens just outside do not carry the key
    assert sample["answers"][0] not in tok.decode([prompt[i] for i in pos[1:]])
    assert sample["answers"][0] not in tok.decode([prompt[i] for i in pos[:-1]])


@pytest.mark.parametrize("query_aware", [False, True])
def test_a_tokenizers_bos_starts_the_prompt_once_and_shifts_the_needle(tiny, query_aware, monkeypatch):
    """A tokenizer that puts a BOS before a text (Gemma3's) gets it once before the evaluation's prompt, as the fit
    and calibration prefill it, and the needle's positions move with it."""
    from polykv_learn import text

    _, tok = tiny
    sample = make_samples(1)[0]
    settings = EvalSettings(query_aware=query_aware, chat=False)
    plain, plain_pos = prompt_pieces(tok, settings, sample), needle_positions(tok, sample, False, None)
    bos = tok.convert_tokens_to_ids(tok.bos_token) if tok.bos_token else 1
    monkeypatch.setattr(text, "leading_special_ids", lambda tokenizer: [bos])
    marked = prompt_pieces(tok, settings, sample)
    assert marked.prompt == [bos, *plain.prompt] and marked.tail == plain.tail and marked.answer == plain.answer
    pos = needle_positions(tok, sample, False, None)
    assert pos == [i + 1 for i in plain_pos]
    assert sample["answers"][0] in tok.decode([marked.prompt[i] for i in pos])


def test_needle_positions_follow_the_middle_cut_and_absent_answers(tiny):
    _, tok = tiny
    sample = make_samples(1)[0]
    whole = needle_positions(tok, sample, False, None)
    c = len(tok(sample["context"], add_special_tokens=False).input_ids)
    # a cut that keeps the first half up to past the needle: unchanged positions
    assert needle_positions(tok, sample, False, 2 * (whole[-1] + 1)) == whole
    # a cut removing the middle (where the key sits): no needle left
    assert needle_positions(tok, sample, False, 20) == []
    # one token cut from the middle: the first half keeps the needle's start, the rest shifts down by one
    assert (c, whole[0]) == (415, 207)  # the needle sits at the middle of the context
    cut = needle_positions(tok, sample, False, c - 1)  # keeps tokens 0..206 and 208..414
    assert cut == [p - 1 for p in whole[1:]]
    prompt = prompt_pieces(tok, EvalSettings(max_context=c - 1), sample).prompt
    full = prompt_pieces(tok, EvalSettings(), sample).prompt
    assert [prompt[i] for i in cut] == [full[i] for i in whole[1:]]
    absent = {**sample, "answers": ["99999999"]}
    assert needle_positions(tok, absent, False, None) == []


def test_retention_of_hand_made_plans():
    stats = layers(n=60)
    needle = [30, 31, 32, 33]
    assert plan_retention(None, stats, needle) == [1.0, 1.0, 1.0]
    assert plan_retention(Plan.uniform("snapkv", 60, 3), stats, needle) == [1.0, 1.0, 1.0]
    # streaming, 4 sinks + 12 recent (positions 48..59): the needle is outside
    assert plan_retention(Plan.uniform("streaming", 16, 3), stats, needle) == [0.0, 0.0, 0.0]
    # 4 sinks + 28 recent (positions 32..59): half of the needle, and per layer its own budget
    plan = Plan.from_lists(["streaming", "streaming", "streaming"], [32, 16, 34])
    assert plan_retention(plan, stats, needle) == [0.5, 0.0, 1.0]
    # head-wise: heads of layer 0 keep 4 + (28, 12, 30) recent; the mean over heads of (2/4, 0, 4/4)
    plan = Plan(("streaming",) * 3, (32, 16, 16), head_budgets=((32, 16, 48), (16,) * 3, (16,) * 3))
    assert plan_retention(plan, stats, needle) == [pytest.approx(0.5), 0.0, 0.0]
    with pytest.raises(ValueError, match="at least one needle position"):
        plan_retention(plan, stats, [])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])  # tiny-gemma3: sliding layers (window 16)
def test_kept_positions_are_what_the_real_cache_keeps(tiny_models, name):
    model = tiny_models[name]
    shared = CompressedCache(model, capture=CaptureOptions(window=8, future=16, accumulate=True))
    adapter.forward(model, random_ids(120, seed=1), shared)
    stats = shared.layer_stats
    num_layers, g = len(stats), stats[0].num_kv_heads
    plans = [
        Plan.uniform("snapkv", 40, num_layers),
        Plan.uniform("streaming", 10, num_layers),
        Plan.from_lists(
            [("h2o", "tova", "knorm")[i % 3] for i in range(num_layers)],
            [(30, 90, 5)[i % 3] for i in range(num_layers)],
        ),
        Plan.adakv("snapkv", 12, stats),
    ]
    assert g == 1 or any(len(set(h)) > 1 for h in plans[-1].head_budgets)  # uneven heads somewhere
    for plan in plans:  # a cache of its own per plan (a fork of the shared prefill does not know sliding windows)
        cache = CompressedCache(model, capture=CaptureOptions(window=8, future=16, accumulate=True))
        adapter.forward(model, random_ids(120, seed=1), cache)
        prefill = [layer.keys for layer in cache.layers]  # (1, G, n, d) each
        assert all(torch.equal(k, s.keys) for k, s in zip(prefill, stats, strict=True))
        cache.compress(plan)
        for i, keeps in enumerate(kept_positions(plan, stats)):
            keys, _, visible, _ = cache.layers[i].padded()  # a ragged layer (heads differ): its dense view
            for h in range(g):
                held = keys[0, h] if visible is None else keys[0, h][visible[0, h]]
                assert torch.equal(held, prefill[i][0, h, keeps[h]])


def test_evaluator_records_hold_the_retention_of_each_plan(tiny):
    model, tok = tiny
    sample = make_samples(1)[0]
    absent = {**make_samples(2)[1], "answers": ["99999999"]}
    methods = resolve_methods(["streaming", "snapkv", "adakv"], available_methods())
    capture = CaptureOptions(window=16, future=16, accumulate=True)
    evaluator = Evaluator(model, tok, methods, EvalSettings(budgets=(24, 64)), capture)
    result = evaluator.evaluate_sample(sample)
    needle = needle_positions(tok, sample, False, None)
    full = next(r for r in result.records if r["method"] == "full")
    assert full["needle_tokens"] == len(needle) > 0 and full["needle_retention"] == 1.0
    # the plans' retention, recomputed on a fresh prefill's statistics
    shared = CompressedCache(model, capture=capture)
    adapter.forward(model, evaluator.encode(sample).prompt_ids, shared)
    for r in result.records[1:]:
        expected = plan_retention(result.plans[r["method"]][r["budget"]], shared.layer_stats, needle)
        assert r["needle_retention_layers"] == expected
        assert r["needle_retention"] == pytest.approx(sum(expected) / len(expected))
    assert {r["needle_retention"] for r in result.records if r["method"] == "streaming"} == {0.0}
    other = evaluator.evaluate_sample(absent)
    assert all(r["needle_tokens"] == 0 and r["needle_retention"] is None for r in other.records)


def test_two_shards_merge_to_the_whole(tiny):
    model, tok = tiny
    samples = make_samples(4)
    samples[3] = {**samples[3], "answers": ["99999999"]}  # no needle: excluded
    methods = resolve_methods(["streaming", "snapkv", "adakv"], available_methods())
    capture = CaptureOptions(window=16, future=16, accumulate=True)
    evaluator = Evaluator(model, tok, methods, EvalSettings(budgets=(24, 64)), capture)
    whole = run_evaluation(evaluator, samples, progress=False)
    parts = [run_evaluation(evaluator, samples[i::2], config={"shard": f"{i}/2"}, progress=False) for i in (0, 1)]
    merged = merge_results(parts)
    assert merged["needle_retention"] == whole["needle_retention"]
    needle = whole["needle_retention"]
    assert needle["samples"] == 3 and needle["excluded"] == 1 and needle["excluded_ids"] == ["s3"]
    assert needle["samples_by_task"] == {"passkey": 2, "variable_tracking": 1}
    row = needle["summary"]["snapkv"]["24"]
    recs = [r for r in whole["samples"] if r["method"] == "snapkv" and r["budget"] == 24 and r["task"] == "passkey"]
    assert row["passkey"] == pytest.approx(sum(r["needle_retention"] for r in recs) / 2)
    assert needle["summary"]["full"]["64"]["average"] == 1.0
    assert len(needle["layers"]["adakv"]["24"]) == len(evaluator.model.model.layers)


def test_report_section_and_records_of_older_runs(tmp_path):
    """results.md shows the retention table; records without the needle fields (older runs) count as excluded."""
    records = []
    for sid, task, kept in (("a", "passkey", [1.0, 0.5]), ("b", "passkey", [0.0, 0.5]), ("c", "code", None)):
        for method, budget, layers in (("full", None, [1.0, 1.0]), ("snapkv", 64, kept)):
            rec = {"id": sid, "task": task, "method": method, "budget": budget, "score": 0.0, "nll": 1.0, "kl": 0.0}
            if sid != "c":
                rec |= {"needle_tokens": 3, "needle_retention_layers": layers, "needle_retention": sum(layers) / 2}
            records.append(rec)
    res = build_results(records, ["full", "snapkv"], ["snapkv"], [64])
    needle = res["needle_retention"]
    assert (needle["samples"], needle["excluded"], needle["excluded_ids"]) == (2, 1, ["c"])
    assert needle["summary"]["snapkv"]["64"] == {"code": None, "passkey": 0.5, "average": 0.5}
    assert needle["layers"]["snapkv"]["64"] == [0.5, 0.5]
    res["config"] = {"budgets": [64], "protocol": "query-agnostic"}
    res["timing"] = {"samples": 3, "seconds": 3.0, "seconds_per_sample": 1.0}
    text = results_markdown(res)
    assert "2 samples whose first gold answer occurs in the context (code 0, passkey 2); 1 excluded" in text
    assert "| full | 1.000 |" in text and "| snapkv | 0.500 |" in text
    plot_needle_retention(res, tmp_path / "needle_retention.png")
    assert (tmp_path / "needle_retention.png").stat().st_size > 0
    old = build_results(
        [{k: v for k, v in r.items() if not k.startswith("needle")} for r in records], ["full"], [], [64]
    )
    assert (old["needle_retention"]["samples"], old["needle_retention"]["excluded"]) == (0, 3)
