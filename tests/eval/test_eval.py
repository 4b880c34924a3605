"""The evaluation runner (`polykv-learn evaluate`) on tiny-llama with SmolLM2's tokenizer."""

import json

import pytest
import torch
from artifact_helpers import make_artifact
from eval_helpers import make_samples, write_jsonl

from polykv_learn import adapter
from polykv_learn.adapter import model_dims
from polykv_learn.cache import CompressedCache
from polykv_learn.capture import CaptureOptions
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.eval.cli import evaluate_main
from polykv_learn.eval.evaluator import EvalSettings, Evaluator
from polykv_learn.eval.methods import available_methods, resolve_methods
from polykv_learn.eval.metrics import gap_recovery
from polykv_learn.eval.results import MEANINGFUL_FULL_SCORE, build_results
from polykv_learn.models import load_model

BUDGETS = (32, 96)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def make_evaluator(model, tok, names=None, router=None, **settings):
    methods = resolve_methods(names, available_methods(router))
    capture = router.capture if router is not None else CaptureOptions(window=16, future=16, accumulate=True)
    capture = CaptureOptions(capture.window, capture.future, True, capture.chunk)
    return Evaluator(model, tok, methods, EvalSettings(**{"budgets": BUDGETS, **settings}), capture)


def test_results_json_structure_and_gap_recovery(tiny, tmp_path):
    model, _ = tiny
    data = write_jsonl(tmp_path / "tiny.jsonl", make_samples())
    router_dir = make_artifact(tmp_path / "router", model)
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        evaluate_main(
            ["--data", str(data), "--model", "tiny-llama", "--router", str(router_dir), "--out", str(out)]
            + ["--budgets", *map(str, BUDGETS), "--no-progress", "--batch-size", "3", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    for name in ("results.json", "results.md", "score_vs_budget.png", "plan_map.png", "needle_retention.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    methods = res["config"]["methods"]
    assert methods[0] == "full" and {"polykv", "polykv-static", "pyramid", "cake", "snapkv"} <= set(methods)
    assert "random" not in methods  # a control: not a default method
    assert res["tasks"] == ["passkey", "variable_tracking"] and res["test_only_tasks"] == ["variable_tracking"]
    for method in methods:
        for b in map(str, BUDGETS):
            row = res["summary"][method][b]
            assert set(row) == {"passkey", "variable_tracking", "average"}
            assert row["average"] == pytest.approx((row["passkey"] + row["variable_tracking"]) / 2)
    assert res["full_cache"] == res["summary"]["full"][str(BUDGETS[0])]
    samples = res["samples"]
    assert len(samples) == 2 * (1 + (len(methods) - 1) * len(BUDGETS))
    for rec in samples:
        assert {"id", "task", "method", "budget", "prediction", "score", "nll", "kl"} <= set(rec)
        assert (rec["budget"] is None) == (rec["method"] == "full")
        assert rec["kl"] >= -1e-6 and rec["nll"] > 0
    # the summary is the mean of the sample scores
    for method in ("snapkv", "polykv"):
        recs = [r for r in samples if r["method"] == method and r["budget"] == BUDGETS[0] and r["task"] == "passkey"]
        assert res["summary"][method][str(BUDGETS[0])]["passkey"] == pytest.approx(
            sum(r["score"] for r in recs) / len(recs)
        )
    # gap recovery by hand from the summary
    singles = res["single_policies"]
    assert set(singles) == {"snapkv", "streaming", "h2o", "tova", "knorm", "expected_attention", "keydiff", "kvzip"}
    for key, tasks in (("gap_recovery", res["tasks"]), ("gap_recovery_test_only", ["variable_tracking"])):
        for b in map(str, BUDGETS):

            def avg(m, b=b, tasks=tasks):
                return sum(res["summary"][m][b][t] for t in tasks) / len(tasks)

            best = max(avg(s) for s in singles)
            for method in ("polykv", "polykv-static", "pyramid", "cake"):
                entry = res[key][method][b]
                assert entry["best_single_score"] == pytest.approx(best)
                assert avg(entry["best_single"]) == pytest.approx(best)
                assert entry["full"] == pytest.approx(avg("full"))
                expected = gap_recovery(avg(method), best, avg("full")) if avg("full") > best else None
                assert entry["gap_recovery"] == (None if expected is None else pytest.approx(expected))
    assert set(res["example_plans"]["polykv"]) == {str(b) for b in BUDGETS}


def test_gap_recovery_arithmetic():
    records = []
    scores = {"full": 0.9, "snapkv": 0.5, "streaming": 0.3, "polykv": 0.7}
    for method, s in scores.items():
        for task, offset in (("a", 0.0), ("b", 0.1)):
            records.append(
                {"id": task, "task": task, "method": method, "budget": None if method == "full" else 64}
                | {"score": s - offset, "nll": 1.0, "kl": 0.0}
            )
    res = build_results(records, list(scores), ["snapkv", "streaming"], [64])
    entry = res["gap_recovery"]["polykv"]["64"]
    assert entry["best_single"] == "snapkv"
    assert entry["gap_recovery"] == pytest.approx((0.65 - 0.45) / (0.85 - 0.45))
    assert res["gap_recovery_test_only"] == {}
    # the full cache below the best single policy: no gap, no ratio
    for r in records:
        if r["method"] == "full":
            r["score"] = 0.2
    res = build_results(records, list(scores), ["snapkv", "streaming"], [64])
    assert res["gap_recovery"]["polykv"]["64"]["gap_recovery"] is None


def test_gap_recovery_on_scored_tasks_only():
    """Tasks the full cache cannot do (mean score < MEANINGFUL_FULL_SCORE) drop out of the scored gap recovery."""
    scores = {  # task -> method -> score
        "easy": {"full": 0.8, "snapkv": 0.2, "streaming": 0.4, "polykv": 0.6},
        "hard": {"full": 0.05, "snapkv": 0.0, "streaming": 0.0, "polykv": 0.0},
        "variable_tracking": {"full": 0.5, "snapkv": 0.3, "streaming": 0.1, "polykv": 0.1},  # test-only
    }
    records = [
        {"id": task, "task": task, "method": m, "budget": None if m == "full" else 64}
        | {"score": s, "nll": 1.0, "kl": 0.0}
        for task, per in scores.items()
        for m, s in per.items()
    ]
    res = build_results(records, ["full", "snapkv", "streaming", "polykv"], ["snapkv", "streaming"], [64])
    assert MEANINGFUL_FULL_SCORE > 0.05
    assert res["scored_tasks"] == ["easy", "variable_tracking"]
    assert res["scored_test_only_tasks"] == ["variable_tracking"]
    entry = res["gap_recovery_scored"]["polykv"]["64"]  # snapkv 0.25, streaming 0.25 (tie: snapkv), full 0.65
    assert entry["best_single"] == "snapkv"
    assert entry["gap_recovery"] == pytest.approx((0.35 - 0.25) / (0.65 - 0.25))
    only = res["gap_recovery_scored_test_only"]["polykv"]["64"]
    assert only["best_single"] == "snapkv" and only["gap_recovery"] == pytest.approx((0.1 - 0.3) / (0.5 - 0.3))
    # all tasks, "hard" included, give another number
    assert res["gap_recovery"]["polykv"]["64"]["gap_recovery"] != pytest.approx(entry["gap_recovery"])


def test_full_equals_generate_and_large_budget_equals_full(tiny):
    model, tok = tiny
    sample = make_samples(1)[0]
    sample["max_new_tokens"] = 8
    ev = make_evaluator(model, tok, ["snapkv", "streaming", "pyramid"], budgets=(64, 4096), batch_size=4)
    enc = ev.encode(sample)
    ids = torch.cat([enc.prompt_ids, enc.tail_ids], dim=1)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    records = ev.evaluate_sample(sample).records
    full = [r for r in records if r["method"] == "full"]
    assert len(full) == 1 and full[0]["prediction"] == expected
    big = [r for r in records if r["budget"] == 4096]
    assert big and all(r["prediction"] == expected and r["kl"] == pytest.approx(0.0, abs=1e-6) for r in big)
    assert all(r["nll"] == pytest.approx(full[0]["nll"], rel=1e-5) for r in big)
    small = [r for r in records if r["budget"] == 64]
    assert all(r["kept"] == 64 for r in small) and any(r["kl"] > 1e-4 for r in small)


@pytest.mark.parametrize("batch_size,group_size", [(64, 8), (64, 3), (4, 1)])
def test_batched_forks_equal_one_at_a_time(tiny, monkeypatch, batch_size, group_size):
    from polykv_learn.eval import evaluator

    model, tok = tiny
    sample = {**make_samples(1)[0], "max_new_tokens": 10}
    # rows settle after different numbers of tokens (a function of their own text), so rows leave the batch at
    # different steps
    monkeypatch.setattr(evaluator, "answer_settled", lambda metric, text, answers=None: len(text) > 8 + len(text) % 5)
    names = ["snapkv", "streaming", "knorm", "pyramid", "cake"]
    batched = make_evaluator(model, tok, names, batch_size=batch_size, group_size=group_size).evaluate_sample(sample)
    single = make_evaluator(model, tok, names, batch_size=1, group_size=1).evaluate_sample(sample).records
    lengths = {len(r["prediction"]) for r in batched.records}
    assert len(lengths) > 2 and max(lengths) < 40  # rows did stop, at different lengths
    assert [r["prediction"] for r in batched.records] == [r["prediction"] for r in single]
    for a, b in zip(batched.records, single, strict=True):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-4, abs=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-5)


def test_shared_prefill_is_not_modified(tiny, monkeypatch):
    model, tok = tiny
    sample = make_samples(1)[0]
    ev = make_evaluator(model, tok, ["snapkv", "h2o", "pyramid"], budgets=(32, 4096))
    shared = {}
    original_init = CompressedCache.__init__

    def spy(self, *args, **kwargs):  # the first cache built for the sample is the shared prefill
        original_init(self, *args, **kwargs)
        shared.setdefault("cache", self)

    monkeypatch.setattr(CompressedCache, "__init__", spy)
    ev.evaluate_sample(sample)
    cache = shared["cache"]
    # a fresh prefill of the same prompt gives the same tensors: nothing was written into the shared one
    monkeypatch.setattr(CompressedCache, "__init__", original_init)
    fresh = CompressedCache(model, capture=ev.capture)
    with torch.no_grad():
        adapter.forward(model, ev.encode(sample).prompt_ids, fresh)
    n = ev.encode(sample).prompt_ids.shape[1]
    for old, new in zip(cache.layers, fresh.layers, strict=True):
        assert old.keys.shape[-2] == n and old.logical_length == n
        torch.testing.assert_close(old.keys, new.keys, rtol=0, atol=0)
        torch.testing.assert_close(old.values, new.values, rtol=0, atol=0)
        assert old.stats is not None  # the statistics are still there (forks drop their own reference only)


def test_in_place_write_is_detected(tiny, monkeypatch):
    model, tok = tiny
    ev = make_evaluator(model, tok, ["snapkv"])
    original = Evaluator._fork

    def bad_fork(self, shared):
        shared.layers[0].keys.add_(0.0)  # an in-place write into the shared prefill
        return original(self, shared)

    monkeypatch.setattr(Evaluator, "_fork", bad_fork)
    with pytest.raises(RuntimeError, match="shared prefill"):
        ev.evaluate_sample(make_samples(1)[0])


def test_query_aware_compresses_the_question(tiny):
    model, tok = tiny
    sample = make_samples(1)[0]
    agnostic = make_evaluator(model, tok, ["snapkv"])
    aware = make_evaluator(model, tok, ["snapkv"], query_aware=True)
    enc_g, enc_w = agnostic.encode(sample), aware.encode(sample)
    # the same token sequence, split at another place
    seq_g = torch.cat([enc_g.prompt_ids, enc_g.tail_ids], 1)
    seq_w = torch.cat([enc_w.prompt_ids, enc_w.tail_ids], 1)
    assert torch.equal(seq_g, seq_w)
    q_len = len(tok("\n\n" + sample["question"], add_special_tokens=False).input_ids)
    assert enc_w.prompt_ids.shape[1] == enc_g.prompt_ids.shape[1] + q_len
    rec_g = agnostic.evaluate_sample(sample).records
    rec_w = aware.evaluate_sample(sample).records
    assert rec_w[0]["context_tokens"] == rec_g[0]["context_tokens"] + q_len
    assert rec_w[0]["prediction"] == rec_g[0]["prediction"]  # full cache: same sequence, same answer
    assert [r["kl"] for r in rec_g[1:]] != pytest.approx([r["kl"] for r in rec_w[1:]])


def test_empty_question_continues_the_context(tiny):
    """Code completion has no question: the text prompt is the context, then a newline and the answer."""
    model, tok = tiny
    sample = {**make_samples(1)[0], "question": "", "answer_prefix": ""}
    enc = make_evaluator(model, tok, ["snapkv"]).encode(sample)
    assert tok.decode(enc.prompt_ids[0]) == sample["context"]
    assert tok.decode(enc.tail_ids[0]) == "\n"


def test_chat_template_and_max_context(tiny):
    model, tok = tiny
    sample = make_samples(1)[0]
    chat = make_evaluator(model, tok, ["snapkv"], chat=True, max_context=100)
    enc = chat.encode(sample)
    text = tok.decode(torch.cat([enc.prompt_ids, enc.tail_ids], 1)[0])
    assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\nThe pass key is" in text
    assert enc.context_tokens == 100 and enc.cut_tokens > 0
    assert enc.prompt_ids.shape[1] == len(tok(text.split("user\n")[0] + "user\n").input_ids) + 100


def test_polykv_methods_run_and_static_plan_is_shared(tiny, tmp_path):
    model, tok = tiny
    router = PolyKV.from_pretrained(make_artifact(tmp_path / "r", model))
    ev = make_evaluator(model, tok, ["polykv", "polykv-static"], router=router)
    result = ev.evaluate_sample(make_samples(1)[0])
    for budget in BUDGETS:
        assert result.plans["polykv-static"][budget] == router.static_plan(budget)
        assert result.plans["polykv"][budget].total_budget == budget * model_dims(model).num_layers
    assert {r["method"] for r in result.records} == {"full", "polykv", "polykv-static"}


def test_bad_methods_fail_clearly(tiny, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_samples())
    with pytest.raises(ValueError, match=r"^--methods: unknown method\(s\) 'snapkvv'"):
        evaluate_main(["--data", str(data), "--model", "tiny-llama", "--out", str(tmp_path), "--methods", "snapkvv"])
    with pytest.raises(ValueError, match=r"unknown method\(s\) 'snapkvv'; allowed: full, .*snapkv"):
        resolve_methods(["snapkv", "snapkvv"], available_methods())
    with pytest.raises(ValueError, match="'polykv' needs --router"):
        resolve_methods(["polykv"], available_methods())
    names = [m.name for m in resolve_methods(["tova", "snapkv", "tova"], available_methods())]
    assert names == ["full", "tova", "snapkv"]


def test_bad_methods_message_on_cli(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_samples())
    with pytest.raises(ValueError, match=r"^--methods: unknown method\(s\) 'bogus'; allowed: full, ") as err:
        evaluate_main(["--data", str(data), "--out", str(tmp_path / "o"), "--no-router", "--methods", "bogus"])
    assert "\n" not in str(err.value)


def test_bad_jsonl_line_fails_with_line_number(tmp_path):
    rows = make_samples()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "answers": "1234"}) + "\n")
    with pytest.raises(ValueError) as err:
        evaluate_main(["--data", str(path), "--out", str(tmp_path / "o"), "--no-router"])
    assert str(err.value).startswith(f"{path}:2: 'answers' must be a non-empty list of strings")
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="invalid JSON") as err:
        evaluate_main(["--data", str(path), "--out", str(tmp_path / "o"), "--no-router"])
    assert str(err.value).startswith(f"{path}:1: invalid JSON")


def test_shards_split_each_task_and_bad_shards_fail(tmp_path):
    from polykv_learn.eval.results import select_samples

    rows = make_samples(7)  # 4 passkey, 3 variable_tracking, alternating
    shards = [select_samples(rows, shard=(i, 3)) for i in range(3)]
    assert sorted(s["id"] for part in shards for s in part) == sorted(r["id"] for r in rows)
    assert [s["id"] for s in shards[0]] == ["s0", "s1", "s6"]  # the 1st and 4th of each task
    assert [s["id"] for s in select_samples(rows, ["passkey"], limit=3, shard=(1, 2))] == ["s2"]
    with pytest.raises(ValueError, match="shard must be I/K with K >= 1 and 0 <= I < K, got 2/2"):
        select_samples(rows, shard=(2, 2))
    data = write_jsonl(tmp_path / "tiny.jsonl", rows)
    out = str(tmp_path / "x")
    with pytest.raises(ValueError, match=r"^--shard must be I/K \(e\.g\. 0/2\), got '1-2'$"):
        evaluate_main(["--data", str(data), "--model", "tiny-llama", "--no-router", "--shard", "1-2", "--out", out])
    with pytest.raises(ValueError, match=r"^--shard: shard must be I/K with K >= 1 and 0 <= I < K, got 3/2$"):
        evaluate_main(["--data", str(data), "--model", "tiny-llama", "--no-router", "--shard", "3/2", "--out", out])


def test_unknown_task_filter_fails(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_samples())
    present = r"present: \['passkey', 'variable_tracking'\]"
    with pytest.raises(ValueError, match=rf"^task\(s\) 'nope' not in the data; {present}"):
        evaluate_main(["--data", str(data), "--out", str(tmp_path / "o"), "--no-router", "--tasks", "nope"])


def test_merge_of_per_task_runs_equals_one_run(tiny, tmp_path):
    """Evaluating each task in its own process and merging gives the one-run summaries (and tables)."""
    data = write_jsonl(tmp_path / "tiny.jsonl", make_samples(4))
    common = ["--data", str(data), "--model", "tiny-llama", "--no-router", "--methods", "snapkv", "streaming",
              "pyramid", "--budgets", "32", "64", "--no-chat", "--no-progress"]  # fmt: skip
    whole = evaluate_main([*common, "--out", str(tmp_path / "whole")])
    evaluate_main([*common, "--tasks", "variable_tracking", "--out", str(tmp_path / "variable_tracking")])
    for shard in ("0/2", "1/2"):  # passkey in two shards of one sample each
        part = evaluate_main([*common, "--tasks", "passkey", "--shard", shard, "--out", str(tmp_path / shard[0])])
        assert part["timing"]["samples"] == 1 and part["config"]["shard"] == shard
    merged = evaluate_main(["--merge", str(tmp_path / "0"), str(tmp_path / "1"), str(tmp_path / "variable_tracking"),
                            "--out", str(tmp_path / "merged")])  # fmt: skip
    assert merged["timing"]["samples"] == 4 and merged["tasks"] == whole["tasks"]
    assert "shard" not in merged["config"]

    def close(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, float) and isinstance(b, float):
            return a == pytest.approx(b, rel=1e-9, abs=1e-12)
        return a == b

    for key in ("summary", "summary_kl", "summary_nll", "full_cache", "gap_recovery", "scored_tasks"):
        assert close(merged[key], whole[key]), key
    assert (tmp_path / "merged" / "results.md").is_file()
    for shard in ("0", "1"):  # each shard's folder has its own per-sample log: its one sample
        lines = (tmp_path / shard / "samples.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines[1:]] == [f"s{2 * int(shard)}"]
    with pytest.raises(ValueError, match=r"^--merge: the runs share samples"):  # the same samples twice
        evaluate_main(["--merge", str(tmp_path / "0"), str(tmp_path / "0"), "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match=r"^--merge: .*passkey/results.json does not exist"):
        evaluate_main(["--merge", str(tmp_path / "0"), str(tmp_path / "passkey"), "--out", str(tmp_path / "x")])


def test_replacing_the_learned_methods_equals_a_full_run_with_the_new_router(tiny, tmp_path):
    """A retrained router is evaluated alone (--methods polykv polykv-static) and combined with the baselines of an
    earlier run: the same results as evaluating every method with the new router."""
    model, _ = tiny
    old = make_artifact(tmp_path / "old", model, seed=0)
    new = make_artifact(tmp_path / "new", model, seed=1, random_allocator=True)
    data = write_jsonl(tmp_path / "tiny.jsonl", make_samples(2))
    common = ["--data", str(data), "--model", "tiny-llama", "--budgets", "32", "64", "--no-chat", "--no-progress"]
    every = ["--methods", "snapkv", "streaming", "polykv", "polykv-static"]
    evaluate_main([*common, *every, "--router", str(old), "--out", str(tmp_path / "base")])
    evaluate_main([*common, "--methods", "polykv", "polykv-static", "--router", str(new), "--out", str(tmp_path / "u")])
    direct = evaluate_main([*common, *every, "--router", str(new), "--out", str(tmp_path / "direct")])
    merged = evaluate_main(["--merge", str(tmp_path / "base"), str(tmp_path / "u"), "--replace",
                            "--out", str(tmp_path / "merged")])  # fmt: skip
    assert merged["summary"] == direct["summary"] and merged["gap_recovery"] == direct["gap_recovery"]
    for key in ("summary_kl", "summary_nll"):  # other batch compositions: fp32 round-off only
        for method, per_budget in direct[key].items():
            for budget, row in per_budget.items():
                assert merged[key][method][budget] == pytest.approx(row, rel=1e-4, abs=1e-6), (key, method, budget)
    assert merged["config"]["router"] == str(new)
    assert merged["config"]["replaced_methods"] == ["polykv", "polykv-static"]
    base_kl = json.loads((tmp_path / "base" / "results.json").read_text())["summary_kl"]
    assert merged["summary_kl"]["polykv"] != base_kl["polykv"]  # the routers differ (a random allocator)
    assert merged["summary_kl"]["snapkv"] == base_kl["snapkv"]
    # not comparable: other samples
    evaluate_main([*common, "--limit", "1", "--tasks", "passkey", "--methods", "polykv", "--router", str(new),
                   "--out", str(tmp_path / "one")])  # fmt: skip
    with pytest.raises(ValueError, match=r"^--merge: the runs evaluated different samples \(2 and 1"):
        evaluate_main(["--merge", str(tmp_path / "base"), str(tmp_path / "one"), "--replace",
                       "--out", str(tmp_path / "x")])  # fmt: skip
    with pytest.raises(ValueError, match=r"^--replace takes exactly two runs, --merge BASE UPDATE; got 1$"):
        evaluate_main(["--merge", str(tmp_path / "base"), "--replace", "--out", str(tmp_path / "x")])


def test_release_free_memory_returns_freed_heap_pages_to_the_os():
    """What keeps a long evaluation's RSS flat: freed heap memory goes back to the OS after each sample."""
    import platform

    from polykv_learn.eval.memory import release_free_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    blocks = [torch.ones(25_000) for _ in range(3000)]  # 100 KB each, below glibc's mmap threshold: heap memory
    pin = torch.ones(25_000)  # allocated last: keeps the heap's top in use, so free() alone cannot shrink it
    del blocks
    before = rss_mb()
    assert release_free_memory()
    assert before - rss_mb() > 200  # of the 300 MB freed
    del pin


def test_decoding_stops_once_the_answer_is_settled(tiny, monkeypatch):
    from polykv_learn.eval import evaluator

    model, tok = tiny
    ev = make_evaluator(model, tok, ["snapkv"])
    enc = ev.encode(make_samples(1)[0])
    shared = CompressedCache(model, capture=ev.capture)
    adapter.forward(model, enc.prompt_ids, shared, logits_to_keep=1)
    (free,), _ = ev._run(shared, [None], enc, 8, None, "code_sim")
    assert len(free.tokens) == 8  # a random tiny model: no EOS, nothing settles
    settled_text = ev._text(free.tokens[:3])
    monkeypatch.setattr(
        evaluator, "answer_settled", lambda metric, text, answers=None: metric == "code_sim" and text == settled_text
    )
    (stopped,), _ = ev._run(shared, [None], enc, 8, None, "code_sim")
    assert stopped.tokens == free.tokens[:3] and stopped.prediction == settled_text.strip()
    (other,), _ = ev._run(shared, [None], enc, 8, None, "string_match")  # the fake settles code_sim only
    assert other.tokens == free.tokens
    ev_off = make_evaluator(model, tok, ["snapkv"], stop_when_settled=False)
    (off,), _ = ev_off._run(shared, [None], enc, 8, None, "code_sim")
    assert off.tokens == free.tokens


def test_no_onednn_runs_the_default_blas_with_the_same_results(tiny, tmp_path):
    """--no-onednn (torch's default float32 products) scores like the oneDNN default: the backends differ only in
    rounding; the run records which one it used."""
    from polykv_learn import onednn

    data = write_jsonl(tmp_path / "tiny.jsonl", make_samples(2))
    common = ["--data", str(data), "--model", "tiny-llama", "--no-router", "--methods", "snapkv", "h2o",
              "--budgets", "32", "--no-chat", "--no-progress"]  # fmt: skip
    try:
        plain = evaluate_main([*common, "--no-onednn", "--out", str(tmp_path / "plain")])
        assert plain["config"]["matmul"] == "default" and not onednn.enabled()
        fast = evaluate_main([*common, "--out", str(tmp_path / "fast")])
    finally:
        onednn.set_enabled(True)
    assert fast["config"]["matmul"] == ("onednn" if onednn.available() else "default")
    for a, b in zip(plain["samples"], fast["samples"], strict=True):
        keys = ("id", "method", "prediction", "score")
        assert [a[k] for k in keys] == [b[k] for k in keys]
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-4, abs=1e-5)
