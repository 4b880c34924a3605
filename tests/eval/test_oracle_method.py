"""The evaluation's ``oracle`` method (a plan search on the sample's own gold answer): an upper bound of the
policy pool that runs only inside ``evaluate``, never by default, and can be deployed by no name."""

import json

import pytest
import torch
from artifact_helpers import make_artifact
from eval_helpers import make_samples, write_jsonl

from polykv_learn import adapter, cli
from polykv_learn.cache import CompressedCache
from polykv_learn.capture import CaptureOptions
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.eval.cli import evaluate_main
from polykv_learn.eval.evaluator import EvalSettings, Evaluator
from polykv_learn.eval.methods import (
    ORACLE_REFUSAL,
    MethodInput,
    all_method_names,
    available_methods,
    default_method_names,
    oracle_policies,
    resolve_methods,
)
from polykv_learn.models import load_model
from polykv_learn.policies import policy_names

SINGLES = ["streaming", "snapkv", "h2o", "tova", "knorm", "expected_attention"]
BUDGETS = (32, 96)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def oracle_run(tiny):
    model, tok = tiny
    methods = resolve_methods([*SINGLES, "oracle"], available_methods())
    settings = EvalSettings(budgets=BUDGETS, batch_size=8)
    evaluator = Evaluator(model, tok, methods, settings, CaptureOptions(window=16, future=16, accumulate=True))
    return evaluator.evaluate_sample(make_samples(1)[0])


def test_oracle_is_never_a_default_method():
    available = available_methods()
    assert "oracle" in available and "oracle" in all_method_names()
    assert "oracle" not in default_method_names(available)
    assert "oracle" not in [m.name for m in resolve_methods(None, available)]
    assert [m.name for m in resolve_methods(["oracle"], available)] == ["full", "oracle"]


def test_oracle_refuses_without_the_gold_answer(tiny):
    model, _ = tiny
    cache = CompressedCache(model, capture=CaptureOptions(window=16, future=16))
    with torch.no_grad():
        adapter.forward(model, torch.arange(100, 160)[None], cache)
    oracle = available_methods()["oracle"]
    with pytest.raises(ValueError, match=f"^{ORACLE_REFUSAL}$"):
        oracle.plan(MethodInput(cache.layer_stats), 16)
    # its pool: the routable policies, H2O and KVzip only when the prefill recorded their statistics
    routable = policy_names(routable_only=True)
    assert oracle_policies(cache.layer_stats) == [p for p in routable if p not in ("h2o", "kvzip")]
    recorded = CompressedCache(model, capture=CaptureOptions(window=16, future=16, reconstruct=True))
    with torch.no_grad():
        adapter.forward(model, torch.arange(100, 160)[None], recorded)
    assert oracle_policies(recorded.layer_stats) == [p for p in routable if p != "h2o"]


def test_oracle_bounds_every_single_policy_and_equals_its_search(oracle_run):
    result = oracle_run
    n = result.context_tokens
    for budget in BUDGETS:
        recs = {r["method"]: r for r in result.records if r["budget"] == budget}
        oracle = recs["oracle"]
        singles = {p: recs[p]["nll"] for p in SINGLES}
        best = min(singles, key=singles.get)
        # the search starts at the best uniform policy (simulated = real cache) and only goes down from there
        assert oracle["search_start_policy"] == best
        assert oracle["search_start_nll"] == pytest.approx(singles[best], abs=1e-4)
        assert oracle["search_nll"] <= oracle["search_start_nll"]
        assert oracle["nll"] == pytest.approx(oracle["search_nll"], abs=1e-4)  # decoded through the real cache
        assert oracle["nll"] <= min(singles.values()) + 1e-4
        assert oracle["search_plans"] >= len(SINGLES) and oracle["search_moves"] >= 0
        plan = result.plans["oracle"][budget]
        assert plan.total_budget == 4 * budget and min(plan.budgets) >= 1 and max(plan.budgets) <= n
        assert set(plan.policies) <= set(SINGLES)
        for name in SINGLES:  # other methods' records carry no search fields
            assert not any(k.startswith("search_") for k in recs[name])
    assert any(r["search_moves"] > 0 for r in result.records if r["method"] == "oracle")


def test_oracle_rounds(tiny):
    """With no rounds the oracle is the best single policy; a bad count is refused before any work."""
    model, tok = tiny
    pool = [p for p in SINGLES if p != "h2o"]  # no accumulated attention recorded
    methods = resolve_methods([*pool, "oracle"], available_methods(oracle_rounds=0))
    evaluator = Evaluator(model, tok, methods, EvalSettings(budgets=(32,)), CaptureOptions(window=16, future=16))
    result = evaluator.evaluate_sample(make_samples(1)[0])
    recs = {r["method"]: r for r in result.records}
    best = min(pool, key=lambda p: recs[p]["nll"])
    assert result.plans["oracle"][32].policies[0] == recs["oracle"]["search_start_policy"] == best
    assert recs["oracle"]["search_moves"] == 0 and recs["oracle"]["nll"] == recs[best]["nll"]
    with pytest.raises(ValueError, match="^oracle_rounds must be an integer >= 0, got -1$"):
        available_methods(oracle_rounds=-1)


def test_no_simulator_without_the_oracle(tiny):
    model, tok = tiny
    evaluator = Evaluator(model, tok, resolve_methods(["snapkv"], available_methods()), EvalSettings(budgets=(32,)))
    assert evaluator.simulator is None


def test_oracle_through_the_evaluate_command(tiny, tmp_path):
    data = write_jsonl(tmp_path / "tiny.jsonl", make_samples(2))
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        evaluate_main(
            ["--data", str(data), "--model", "tiny-llama", "--no-router", "--out", str(out), "--budgets", "32"]
            + ["--methods", "snapkv", "oracle", "--oracle-rounds", "1", "--no-progress", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["methods"] == ["full", "snapkv", "oracle"]
    assert res["config"]["oracle_rounds"] == 1
    oracle = [r for r in res["samples"] if r["method"] == "oracle"]
    snapkv = {r["id"]: r for r in res["samples"] if r["method"] == "snapkv"}
    assert len(oracle) == 2
    for r in oracle:
        assert r["nll"] <= snapkv[r["id"]]["nll"] + 1e-4
        assert r["search_moves"] <= 1  # --oracle-rounds 1
    # the per-sample log holds the same records
    lines = (out / "samples.jsonl").read_text().splitlines()[1:]
    logged = [r for line in lines for r in json.loads(line)["records"] if r["method"] == "oracle"]
    assert logged == oracle


# --- no deployment by the name "oracle" -----------------------------------------------------------------------
def test_make_cache_refuses_oracle(tiny, tmp_path):
    model, _ = tiny
    polykv = PolyKV.from_pretrained(make_artifact(tmp_path / "router", model))
    with pytest.raises(ValueError, match=r"^mode must be one of adaptive, static, got 'oracle'$"):
        polykv.make_cache(model, budget=32, mode="oracle")


def test_generate_refuses_mode_oracle(tiny, tmp_path, capsys):
    model, _ = tiny
    router = make_artifact(tmp_path / "router", model)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is the pass key?\n")
    argv = ["generate", "--router", str(router), "--budget", "8", "--prompt-file", str(prompt), "--mode", "oracle"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("polykv-learn generate: error: argument --mode: invalid choice: 'oracle'")


def test_with_a_router_the_ceiling_is_never_below_polykv(tiny, tmp_path):
    """The learned plan is one of the search's starts, so the oracle's NLL is at most polykv's."""
    model, tok = tiny
    router = PolyKV.from_pretrained(make_artifact(tmp_path / "router", model, random_allocator=True))
    methods = resolve_methods(["polykv", "oracle"], available_methods(router, oracle_rounds=0))
    settings = EvalSettings(budgets=BUDGETS, batch_size=8)
    evaluator = Evaluator(model, tok, methods, settings, CaptureOptions(window=16, future=16, accumulate=True))
    for sample in make_samples(2):
        records = evaluator.evaluate_sample(sample).records
        for budget in BUDGETS:
            by_method = {r["method"]: r for r in records if r["budget"] == budget}
            assert by_method["oracle"]["nll"] <= by_method["polykv"]["nll"] + 1e-4
            assert by_method["oracle"]["search_start_policy"] in (*SINGLES, "polykv")
