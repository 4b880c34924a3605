"""``model.head_allocation`` end to end (issue #17): a tiny fit with ``learned`` trains and exports a head allocator;
the artifact loads, plans a tiny-llama prompt with every layer's head total exact, deploys in an adaptive cache whose
logits equal the simulator's under the same plan, and drives the ``polykv-heads`` evaluation method; ``adakv`` is
recorded, ``none`` adds nothing; a missing or mis-shaped head allocator is refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from learn_helpers import TINY_CONFIG
from model_helpers import random_ids

from polykv_learn import adapter
from polykv_learn.deploy.artifact import read_artifact, write_artifact
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.eval.methods import MethodInput, available_methods
from polykv_learn.head_features import HEAD_FEATURE_NAMES
from polykv_learn.learn.datamodule import PrefillDataModule
from polykv_learn.learn.fitcli import run_fit
from polykv_learn.learn.module import PolyKVLearner
from polykv_learn.learn.store import PrefillStore
from polykv_learn.models import load_model
from polykv_learn.simulator import Simulator

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0"]


def fit(corpus: Path, root: Path, *extra: str) -> Path:
    """A short tiny fit; returns its artifact folder."""
    art = root / "artifact"
    argv, sys.argv = sys.argv, ["polykv-learn"]
    try:
        run_fit(["fit", "--config", str(TINY_CONFIG), f"--data.data_dir={corpus}", f"--data.cache_dir={root / 'c'}",
                 *QUIET, f"--model.export_dir={art}", f"--trainer.default_root_dir={root}", *extra])  # fmt: skip
    finally:
        sys.argv = argv
    return art


@pytest.fixture(scope="module")
def learned_art(tiny_corpus, tmp_path_factory) -> Path:
    return fit(tiny_corpus, tmp_path_factory.mktemp("learned"), "--model.head_allocation=learned",
               "--trainer.max_steps=6", "--trainer.val_check_interval=3")  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama", with_tokenizer=False)[0]


def randomised_copy(art: Path, out: Path, seed: int = 0, scale: float = 3.0) -> PolyKV:
    """The artifact with random head-allocator weights (an uneven split somewhere)."""
    config, tensors = read_artifact(art)
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in tensors if k.startswith("head_allocator.")]:
        tensors[key] = torch.randn(tensors[key].shape, generator=gen) * scale
    return PolyKV.from_pretrained(write_artifact(out, {k: v for k, v in config.items() if k != "format"}, tensors))


def check_heads(plan, g: int, budget: int, n: int) -> None:
    assert plan.total_budget == plan.num_layers * budget and plan.head_budgets is not None
    for b, heads in zip(plan.budgets, plan.head_budgets, strict=True):
        assert sum(heads) == g * b and min(heads) >= 0 and max(heads) <= max(b, n)


def test_a_learned_fit_exports_a_trained_head_allocator_that_plans(learned_art, model):
    config = json.loads((learned_art / "polykv.json").read_text())
    assert config["head_allocation"] == "learned"
    assert config["head_allocator"]["feature_names"] == HEAD_FEATURE_NAMES
    assert "head allocation: learned" in (learned_art / "README.md").read_text()
    assert set(config["validation"]) == {"32", "64"}  # validation ran with head plans, and without them
    assert all("learned_even_heads" in row for row in config["validation"].values())
    assert "| B | learned | learned, heads even | best uniform (policy) |" in (learned_art / "README.md").read_text()
    polykv = PolyKV.from_pretrained(learned_art)
    assert polykv.head_allocation == "learned" and polykv.planner.head_allocator is not None
    assert polykv.planner.head_allocator.net[-1].weight.detach().abs().sum() > 0  # trained from its zero start
    ids = random_ids(300, seed=0)[0]
    g = adapter.model_dims(model).num_kv_heads
    for budget in (16, 32, 64):
        plan = polykv.plan_for(model, ids, budget, head_allocation="learned")
        check_heads(plan, g, budget, 300)
        assert plan.with_head_budgets(None) == polykv.plan_for(model, ids, budget)  # same layer plan
    assert polykv.plan_for(model, ids, 400, head_allocation="learned").head_budgets is None  # n <= B


def test_the_deployed_learned_head_cache_equals_the_simulator(learned_art, model, tmp_path):
    polykv = randomised_copy(learned_art, tmp_path / "random")
    context, probe, budget = random_ids(200, seed=1), random_ids(12, seed=2), 24
    plan = polykv.plan_for(model, context[0], budget, head_allocation="learned")
    check_heads(plan, adapter.model_dims(model).num_kv_heads, budget, 200)
    assert any(len(set(h)) > 1 for h in plan.head_budgets), "the split must be uneven somewhere"
    cache = polykv.make_cache(model, budget, head_allocation="learned")
    with torch.no_grad():
        adapter.forward(model, context, cache)
        logits = adapter.forward(model, probe, cache).logits[0].float()
    assert cache.applied_plans == [plan]
    expected = Simulator(model, polykv.capture).evaluate(context, probe, [plan]).logits[0]
    assert (expected - logits).abs().max().item() <= 1e-4
    # every row of a left-padded batch gets its own plan, the one it gets alone
    lengths = (150, 90)
    ids = torch.zeros(2, 150, dtype=torch.long)
    mask = torch.zeros(2, 150, dtype=torch.long)
    for r, m in enumerate(lengths):
        ids[r, 150 - m :], mask[r, 150 - m :] = random_ids(m, seed=5 + r)[0], 1
    cache = polykv.make_cache(model, budget, head_allocation="learned")
    with torch.no_grad():
        adapter.forward(model, ids, cache, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    alone = [
        polykv.plan_for(model, ids[r, 150 - m :], budget, head_allocation="learned") for r, m in enumerate(lengths)
    ]
    assert cache.applied_plans == alone


def test_polykv_heads_uses_the_learned_split_when_the_router_has_one(learned_art, model, tmp_path):
    polykv = randomised_copy(learned_art, tmp_path / "random")
    from polykv_learn.cache import CompressedCache

    cache = CompressedCache(model, capture=polykv.capture)
    with torch.no_grad():
        adapter.forward(model, random_ids(180, seed=3), cache)
    method = available_methods(polykv)["polykv-heads"]
    assert method.head_allocation == "learned" and "learned head allocator" in method.description
    plan = method.plan(MethodInput(cache.layer_stats), 32)
    assert plan == polykv.plan_for_stats(cache.layer_stats, 32, head_allocation="learned")
    assert plan != polykv.plan_for_stats(cache.layer_stats, 32, head_allocation="adakv")


def test_learned_head_allocation_needs_an_artifact_with_a_head_allocator(learned_art, model, tmp_path):
    config, tensors = read_artifact(learned_art)
    plain = {k: v for k, v in config.items() if k not in ("format", "head_allocation", "head_allocator", "head_scaler")}
    without = {k: v for k, v in tensors.items() if not k.startswith("head_allocator.")}
    old = PolyKV.from_pretrained(write_artifact(tmp_path / "old", plain, without))  # an artifact of before loads
    assert old.head_allocation == "none" and old.planner.head_allocator is None
    method = available_methods(old)["polykv-heads"]
    assert method.head_allocation == "adakv"
    message = "head_allocation='learned' needs an artifact with a learned head allocator"
    for call in (
        lambda: old.make_cache(model, 24, head_allocation="learned"),
        lambda: old.plan_for(model, random_ids(40, seed=1)[0], 24, head_allocation="learned"),
        lambda: old.layerwise_planner(24, head_allocation="learned"),
    ):
        with pytest.raises(ValueError, match=f"^{message}") as err:
            call()
        assert "\n" not in str(err.value)
    polykv = PolyKV.from_pretrained(learned_art)
    with pytest.raises(ValueError, match=r"^head_allocation='learned' needs mode='adaptive'"):
        polykv.make_cache(model, 24, mode="static", head_allocation="learned")


BAD_ARTIFACTS = [
    (lambda c, t: t.pop("head_allocator.net.2.weight"), "tensor head_allocator.net.2.weight is missing from"),
    (lambda c, t: t.__setitem__("head_allocator.net.0.weight", torch.zeros(32, 3)),
     "tensor head_allocator.net.0.weight must have shape (32, 9), got (32, 3)"),
    (lambda c, t: c.pop("head_allocator"), "head_allocator must be an object"),
    (lambda c, t: c.__setitem__("head_allocation", "global"),
     "head_allocation must be absent, 'learned' or 'adakv', got a string ('global')"),
    (lambda c, t: c.__setitem__("head_allocation", "adakv"),
     "head_allocator must be absent unless head_allocation is 'learned'"),
    (lambda c, t: c["head_scaler"].__setitem__("std", [1.0]), "head_scaler.std must be"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "message"), BAD_ARTIFACTS, ids=[m for _, m in BAD_ARTIFACTS])
def test_a_bad_head_allocator_is_refused_in_one_line(learned_art, tmp_path, edit, message):
    config, tensors = read_artifact(learned_art)
    edit(config, tensors)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "polykv.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "weights.safetensors")
    with pytest.raises(ValueError) as err:
        PolyKV.from_pretrained(folder)
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_adakv_is_recorded_and_none_adds_nothing(tiny_corpus, tmp_path, model):
    art = fit(tiny_corpus, tmp_path, "--model.head_allocation=adakv", "--trainer.max_steps=2")
    config = json.loads((art / "polykv.json").read_text())
    assert config["head_allocation"] == "adakv" and "head_allocator" not in config
    polykv = PolyKV.from_pretrained(art)
    assert polykv.head_allocation == "adakv" and available_methods(polykv)["polykv-heads"].head_allocation == "adakv"
    sim = Simulator(model)
    args = (tmp_path / "s", sim, ["snapkv"], ["snapkv", "tova"], [16, 32])
    assert "head_features" not in PrefillStore(*args).fingerprint  # old stores keep their files
    assert json.loads(PrefillStore(*args, head_features=True).fingerprint)["head_features"] == HEAD_FEATURE_NAMES


def test_the_python_api_checks_head_allocation_in_one_line(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"^head_allocation must be one of none, learned, adakv, got 'heads'$"):
        PolyKVLearner(model_name="tiny-llama", head_allocation="heads")
    with pytest.raises(ValueError, match=r"^head_allocation must be one of none, learned, adakv, got 'heads'$"):
        PrefillDataModule(data_dir=str(tiny_corpus), model_name="tiny-llama", head_allocation="heads")
    learner = PolyKVLearner(model_name="tiny-llama", policies=["snapkv"], val_budgets=[32], b_min=2, budget_min=16)
    dm = PrefillDataModule(data_dir=str(tiny_corpus), cache_dir=str(tmp_path), model_name="tiny-llama",
                           policies=["snapkv"], budgets=[16, 32], head_allocation="learned")  # fmt: skip
    message = (
        "data.head_allocation 'learned' must equal model.head_allocation 'none' (learned needs the per-head signals "
        "in the prefills)"
    )
    with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        learner.check_data(dm)
    assert learner.head_allocator is None and not any("head" in k for k in learner.state_dict())


def test_generate_cli_uses_the_learned_split_by_default_and_checks_the_option(learned_art, tmp_path, capsys):
    """``polykv-learn generate`` on an artifact with a head allocator: ``auto`` splits heads as the library's
    ``make_cache(..., head_allocation="learned")`` does; a static mode with a split is refused in one line."""
    from polykv_learn import cli
    from polykv_learn.cache import cache_bytes
    from polykv_learn.models import load_tokenizer

    art = tmp_path / "random"
    polykv = randomised_copy(learned_art, art)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    argv = ["generate", "--router", str(art), "--budget", "8", "--prompt-file", str(prompt), "--no-chat",
            "--max-new-tokens", "3"]  # fmt: skip
    cli.main(argv)
    out = capsys.readouterr().out
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    tok = load_tokenizer("tiny-llama")
    ids = torch.tensor([tok(prompt.read_text()).input_ids])
    cache = polykv.make_cache(model, budget=8, head_allocation="learned")
    with torch.no_grad():
        reference = model.generate(ids, **{adapter.cache_kwarg(model): cache}, max_new_tokens=3, do_sample=False)
    answer = tok.decode(reference[0, ids.shape[1] :], skip_special_tokens=True)
    assert cache.applied_plan.head_budgets is not None
    assert out.startswith(answer + f"\n\n--- plan (adaptive, budget 8, heads: learned, context {ids.shape[1]} tokens)")
    assert str(cache.applied_plan) in out and f"KV bytes: {cache_bytes(cache):,} vs full" in out
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--mode", "static", "--head-allocation", "learned"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == [
        "polykv-learn generate: error: --head-allocation learned needs --mode adaptive (heads are split by the "
        "prefill's signals)"
    ]
