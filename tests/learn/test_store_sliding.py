"""Prefill stores of a sliding-window model (tiny-gemma3: window 16 on layers 0-2, one full layer): a stored prefill
keeps each layer's window, so it keeps the keep sets and logits of a fresh capture; a file of the format before
windows is never read for such a model (rebuilt); a full-attention model's stores keep their fingerprint; and a
tiny-gemma3 fit trains, validates and exports a router that loads and plans."""

import json
import subprocess

import pytest
import torch
from learn_helpers import fit_cmd
from model_helpers import random_ids

from polykv_learn.capture import CaptureOptions
from polykv_learn.learn.store import FORMAT_VERSION, FULL_ATTENTION_VERSION, PrefillStore
from polykv_learn.models import load_model
from polykv_learn.plan import Plan
from polykv_learn.simulator import Simulator

POLICIES = ["streaming", "snapkv", "h2o", "tova", "knorm"]
OVERLAP = ["snapkv", "streaming", "tova", "knorm"]
N, M, WINDOW = 48, 6, 16  # context past the window, probe tokens, tiny-gemma3's window


@pytest.fixture(scope="module")
def gemma():
    model = load_model("tiny-gemma3", with_tokenizer=False)[0]
    return Simulator(model, CaptureOptions(window=8))


@pytest.fixture(scope="module")
def stored(gemma, tmp_path_factory):
    """A fresh capture (accumulated attention for H2O) and the same context's stored prefill, loaded."""
    store = PrefillStore(tmp_path_factory.mktemp("store"), gemma, POLICIES, OVERLAP, [8, 24])
    context, probe = random_ids(N, seed=3)[0], random_ids(M, seed=4)[0]
    store.build("s", context, probe)
    return store, gemma.capture(context, accumulate=True), store.load("s"), probe


def _mixed_plans() -> list[Plan]:
    """Plans mixing policies across layers, with budgets under, at and over the window's W - 1 = 15 positions."""
    return [
        Plan.from_lists(["snapkv", "h2o", "streaming", "tova"], [4, 15, 30, 12]),
        Plan.from_lists(["knorm", "tova", "snapkv", "h2o"], [40, 8, 15, 40]),
        Plan.from_lists(["h2o", "streaming", "knorm", "snapkv"], [16, 20, 2, 6]),
        Plan.uniform("tova", 10, 4),
        Plan.uniform("streaming", 48, 4),
    ]


def test_a_stored_prefill_keeps_the_windows_and_the_keep_sets_of_a_fresh_capture(gemma, stored):
    store, fresh, loaded, _ = stored
    assert loaded.windows == store.windows == [WINDOW, WINDOW, WINDOW, None]
    capture = loaded.to_capture()
    for layer in range(4):
        for policy in POLICIES:
            for budget in (1, 8, 14, 15, 16, 30, N):
                ours, ref = capture.keep_mask(layer, policy, budget), fresh.keep_mask(layer, policy, budget)
                assert torch.equal(ours, ref), (layer, policy, budget)
    # what the stored windows change: without them a sliding layer would keep positions out of its window
    blind = loaded.to_capture()
    blind.windows = [None] * 4
    assert int(blind.keep_mask(0, "snapkv", 30).sum()) == 30 > int(capture.keep_mask(0, "snapkv", 30).sum()) == 15


def test_a_stored_prefill_simulates_mixed_plans_like_a_fresh_capture(gemma, stored):
    """Same logits (<= 1e-5) for plans mixing policies and budgets, the fresh capture's K/V rounded to float16 as
    the store keeps them."""
    _, fresh, loaded, probe = stored
    fresh.keys = [k.half().float() for k in fresh.keys]
    fresh.values = [v.half().float() for v in fresh.values]
    capture = loaded.to_capture()
    plans = _mixed_plans()
    with torch.no_grad():
        ours = gemma.probe_logits(capture, probe, gemma.hard_biases(capture, plans))
        ref = gemma.probe_logits(fresh, probe, gemma.hard_biases(fresh, plans))
    assert ours.shape == (len(plans), M, gemma.model.config.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_a_capture_without_statistics_or_windows_is_refused(stored):
    capture = stored[2].to_capture()
    capture.windows = []
    message = r"^layer 0 has neither statistics nor a window: a capture without statistics needs windows \(one per"
    with pytest.raises(ValueError, match=message):
        capture.keep_mask(0, "snapkv", 8)


def test_a_file_of_the_format_before_windows_is_rebuilt_never_read(gemma, stored, tmp_path):
    store, _, _, probe = stored
    made_by = json.loads(store.fingerprint)
    assert made_by["version"] == FORMAT_VERSION == 2 and made_by["windows"] == [WINDOW, WINDOW, WINDOW, None]
    old = PrefillStore(tmp_path, gemma, POLICIES, OVERLAP, [8, 24])  # the version-1 fingerprint, no windows
    old.fingerprint = json.dumps({**{k: v for k, v in made_by.items() if k != "windows"}, "version": 1}, sort_keys=True)
    context = random_ids(N, seed=3)[0]
    old_path = old.build("s", context, probe)
    new = PrefillStore(tmp_path, gemma, POLICIES, OVERLAP, [8, 24])
    assert new.path_for("s") != old_path and not new.has("s")
    new.path_for("s").write_bytes(old_path.read_bytes())  # even under the new name, its fingerprint gives it away
    assert not new.has("s")
    with pytest.raises(FileNotFoundError, match="no valid cached prefill for sample 's'"):
        new.load("s")
    new.build("s", context, probe)
    assert new.has("s") and new.load("s").windows == [WINDOW, WINDOW, WINDOW, None]


def test_a_full_attention_models_store_keeps_its_fingerprint(tmp_path):
    model = load_model("tiny-llama", with_tokenizer=False)[0]
    store = PrefillStore(tmp_path, Simulator(model, CaptureOptions(window=8)), POLICIES, OVERLAP, [8])
    made_by = json.loads(store.fingerprint)
    assert made_by["version"] == FULL_ATTENTION_VERSION == 1 and "windows" not in made_by
    store.build("s", random_ids(24, seed=5)[0], random_ids(4, seed=6)[0])
    assert store.load("s").windows == [None] * 4


def test_a_tiny_gemma3_fit_trains_validates_and_exports_a_router_that_plans(tiny_corpus, prefill_cache, tmp_path):
    art = tmp_path / "artifact"
    common = [f"--data.data_dir={tiny_corpus}", f"--data.cache_dir={prefill_cache}", "--model.model_name=tiny-gemma3"]
    steps = ["--trainer.max_steps=6", "--trainer.val_check_interval=3", "--data.max_train_samples=4"]
    out = subprocess.run(
        fit_cmd(*common, *steps, f"--model.export_dir={art}", "--trainer.enable_progress_bar=false"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((art / "polykv.json").read_text())
    assert config["model"]["num_layers"] == 4 and config["model"]["num_kv_heads"] == 1
    assert set(config["validation"]) == {"32", "64"}
    for table in config["validation"].values():  # the learned plan and every single policy, each a finite KL
        assert {"learned", *POLICIES, "expected_attention"} <= set(table)
        assert all(v == v and 0 <= v < float("inf") for v in table.values()), table
    from polykv_learn.deploy.polykv import PolyKV

    polykv = PolyKV.from_pretrained(art)
    model = load_model("tiny-gemma3", with_tokenizer=False)[0]
    plan = polykv.plan_for(model, random_ids(100, seed=7)[0], 32)
    assert plan.total_budget == 4 * 32 and set(plan.policies) <= {*POLICIES, "expected_attention"}
    assert polykv.static_plan(32).total_budget == 4 * 32
