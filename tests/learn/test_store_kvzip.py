"""Prefill stores that route to KVzip: the ranks they cache come from the reconstruction pass, their fingerprint
names the repeat prompt, and stores of the earlier policy sets keep their fingerprint (their files stay valid)."""

import json

import pytest
import torch
from model_helpers import random_ids

from polykv_learn.capture import CaptureOptions
from polykv_learn.kvzip_global import normalised_scores, prior_column
from polykv_learn.learn.store import FULL_ATTENTION_VERSION, PrefillStore
from polykv_learn.models import load_model
from polykv_learn.reconstruct import repeat_prompt_ids
from polykv_learn.simulator import Simulator

ROUTED = ["streaming", "snapkv", "h2o", "tova", "knorm", "expected_attention"]  # the default fit's policies
OVERLAP = ["snapkv", "streaming", "tova", "knorm"]


def test_store_fingerprints(tmp_path):
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    sim = Simulator(model, CaptureOptions(window=16))
    old = json.loads(PrefillStore(tmp_path, sim, ROUTED, OVERLAP, [16, 32]).fingerprint)
    # exactly what the format wrote before kvzip existed: files of these stores are reused, not rebuilt
    assert set(old) == {"version", "model", "policies", "overlap_policies", "budgets", "capture"}
    assert old["version"] == FULL_ATTENTION_VERSION == 1 and old["capture"] == [16, 32, 256]
    assert "reconstruct_prompt" not in json.loads(PrefillStore(tmp_path, sim, ["keydiff"], OVERLAP, [16]).fingerprint)
    new = PrefillStore(tmp_path, sim, [*ROUTED, "kvzip"], OVERLAP, [16, 32])
    assert json.loads(new.fingerprint)["reconstruct_prompt"] == list(repeat_prompt_ids(model, sim.capture_options))
    other = Simulator(model, CaptureOptions(window=16, reconstruct_prompt=(198, 5)))
    assert PrefillStore(tmp_path, other, [*ROUTED, "kvzip"], OVERLAP, [16, 32]).path_for("a") != new.path_for("a")


def test_a_stored_kvzip_rank_is_the_reconstruction_passs(tmp_path):
    model, _ = load_model("tiny-qwen3", with_tokenizer=False)
    sim = Simulator(model, CaptureOptions(window=16))
    store = PrefillStore(tmp_path, sim, ["kvzip", "keydiff", "snapkv"], ["snapkv", "kvzip"], [16, 32])
    context, probe = random_ids(80, seed=1)[0], random_ids(6, seed=2)[0]
    store.build("s", context, probe)
    loaded = store.load("s")
    capture = sim.capture(context, reconstruct=True)
    for layer in range(4):
        for policy in ("kvzip", "keydiff", "snapkv"):
            assert torch.equal(loaded.ranks[(layer, policy)], capture.ranks(layer, policy)), (layer, policy)
    assert not torch.equal(loaded.ranks[(0, "kvzip")], loaded.ranks[(0, "snapkv")])
    assert loaded.features.shape[:2] == (2, 4)


def test_a_store_with_the_kvzip_global_prior_appends_its_column(tmp_path):
    """The prior's column is computed across layers from the reconstruction pass, after the per-layer features;
    the store's fingerprint names it (a store without it keeps its files)."""
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    sim = Simulator(model, CaptureOptions(window=16))
    plain = PrefillStore(tmp_path, sim, ["snapkv"], OVERLAP, [16, 32])
    store = PrefillStore(tmp_path, sim, ["snapkv"], OVERLAP, [16, 32], allocation_prior="kvzip_global")
    assert store.reconstruct and not plain.reconstruct
    assert json.loads(store.fingerprint)["allocation_prior"] == "kvzip_global"
    assert "allocation_prior" not in json.loads(plain.fingerprint)
    context, probe = random_ids(90, seed=4)[0], random_ids(6, seed=5)[0]
    store.build("s", context, probe)
    plain.build("s", context, probe)
    with_prior, without = store.load("s").features, plain.load("s").features  # (K, L, F + 1), (K, L, F)
    assert with_prior.shape == (*without.shape[:2], without.shape[2] + 1)
    torch.testing.assert_close(with_prior[..., :-1], without)
    capture = sim.capture(context, reconstruct=True)
    scores = [normalised_scores(s) for s in capture.stats]
    for k, budget in enumerate((16, 32)):
        torch.testing.assert_close(with_prior[k, :, -1], prior_column(scores, budget))
    with pytest.raises(ValueError, match="allocation_prior must be null or one of kvzip_global, got 'cake'"):
        PrefillStore(tmp_path, sim, ["snapkv"], OVERLAP, [16], allocation_prior="cake")


def test_a_chunk_scope_store_names_its_scores_definition_and_caches_its_ranks(tmp_path):
    """reconstruct_scope "chunk": the fingerprint names the scope, chunk size, sinks and prompt pieces (so its
    files are never mistaken for the full scope's, whose fingerprint is unchanged) and its kvzip ranks are the
    chunk-scope capture's."""
    from polykv_learn.reconstruct_chunked import chunk_prompt_ids

    model, _ = load_model("tiny-llama", with_tokenizer=False)
    full = PrefillStore(tmp_path, Simulator(model, CaptureOptions(window=16)), ["kvzip"], OVERLAP, [16])
    opts = CaptureOptions(window=16, reconstruct_scope="chunk", reconstruct_context_chunk=32, reconstruct_sinks=4)
    sim = Simulator(model, opts)
    store = PrefillStore(tmp_path, sim, ["kvzip", "snapkv"], OVERLAP, [16])
    made_by, made_full = json.loads(store.fingerprint), json.loads(full.fingerprint)
    assert "reconstruct_scope" not in made_full and "reconstruct_prompt" in made_full
    prompts = chunk_prompt_ids(model)
    assert made_by["reconstruct_scope"] == {
        "scope": "chunk",
        "context_chunk": 32,
        "sinks": 4,
        "prev_tokens": 8,
        "prompts": [list(prompts.first), list(prompts.later), list(prompts.suffix)],
    }
    assert "reconstruct_prompt" not in made_by
    plain = PrefillStore(tmp_path, Simulator(model, opts), ["snapkv"], OVERLAP, [16])  # no pass: no scope key
    assert "reconstruct_scope" not in json.loads(plain.fingerprint)
    context, probe = random_ids(80, seed=1)[0], random_ids(6, seed=2)[0]
    store.build("s", context, probe)
    capture = sim.capture(context, reconstruct=True)
    for layer in range(4):
        assert torch.equal(store.load("s").ranks[(layer, "kvzip")], capture.ranks(layer, "kvzip"))
