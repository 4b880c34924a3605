"""Artifact save (atomic swap, crash safety, permissions) and load validation (every field of polykv.json, the
tensor shapes); see docs/artifact-format.md."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_helpers import make_artifact
from safetensors.torch import load_file, save_file

from polykv_learn import atomic
from polykv_learn.deploy import artifact as art
from polykv_learn.deploy.artifact import read_artifact, write_artifact
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.features import feature_names
from polykv_learn.models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("tiny-llama")


@pytest.fixture()
def source(tiny, tmp_path_factory):
    """config and tensors of a valid tiny artifact (read back from disk, so JSON types)."""
    directory = make_artifact(tmp_path_factory.mktemp("src") / "a", tiny)
    return read_artifact(directory)


def _version(config, tensors, tag):
    config = {k: v for k, v in config.items() if k != "format"}
    config["training"] = {"tag": tag}
    return config, tensors


def _tag(directory):
    return read_artifact(directory)[0]["training"]["tag"]


def _listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_bundled_artifact_loads_and_validates():
    config, tensors = read_artifact(REPO / "checkpoints" / "smollm2-135m")
    assert config["model"]["max_positions"] == 8192
    assert tensors["calibration_features"].shape == (len(config["budgets"]), 30, len(config["feature_names"]))


def test_save_replaces_and_keeps_the_model_card(source, tmp_path):
    target = tmp_path / "art"
    write_artifact(target, *_version(*source, "old"))
    (target / "README.md").write_text("card\n")
    write_artifact(target, *_version(*source, "new"))
    assert _tag(target) == "new" and (target / "README.md").read_text() == "card\n"
    assert _listing(tmp_path) == ["art"] and _listing(target) == ["README.md", "polykv.json", "weights.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_follow_the_umask(source, tmp_path, umask):
    previous = os.umask(umask)
    try:
        target = write_artifact(tmp_path / "art", *_version(*source, "x"))
    finally:
        os.umask(previous)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask
    for name in ("polykv.json", "weights.safetensors"):
        assert ((target / name).stat().st_mode & 0o777) == 0o666 & ~umask


def _fail(*exc_args, exc=OSError, after=0):
    """A replacement that lets ``after`` calls through to ``real`` (bound later), then raises."""
    calls = {"n": 0}

    def make(real):
        def fn(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise exc(*exc_args)
            return real(*args, **kwargs)

        return fn

    return make


# (name, use the atomic swap?, object and attribute to break, calls let through, exception, expected tag);
# exception None: the save does not call it and succeeds
FAILURES = [
    ("swap raises", True, (atomic, "_exchange"), 0, OSError, "old"),
    ("rmtree after swap", True, (shutil, "rmtree"), 0, OSError, "new"),
    ("os.rename", True, (os, "rename"), 0, None, "new"),
    ("no swap: os.rename", False, (os, "rename"), 0, None, "new"),
    ("interrupt in save_file", True, (art, "save_file"), 0, KeyboardInterrupt, "old"),
    ("no swap: 1st os.replace", False, (os, "replace"), 0, OSError, "old"),
    ("no swap: 2nd os.replace", False, (os, "replace"), 1, OSError, "old"),
    ("no swap: rmtree", False, (shutil, "rmtree"), 0, OSError, "new"),
    ("no swap: interrupt in 2nd os.replace", False, (os, "replace"), 1, KeyboardInterrupt, "old"),
]


@pytest.mark.parametrize("case", FAILURES, ids=[c[0] for c in FAILURES])
def test_a_failed_save_leaves_the_old_or_the_new_artifact(source, tmp_path, monkeypatch, case):
    _, swap, (owner, attr), after, exc, expected = case
    target = write_artifact(tmp_path / "art", *_version(*source, "old"))
    with monkeypatch.context() as m:
        if not swap:
            m.setattr(atomic, "_exchange", lambda a, b: False)
        m.setattr(owner, attr, _fail("injected", exc=exc or OSError, after=after)(getattr(owner, attr)))
        if exc is None:
            write_artifact(target, *_version(*source, "new"))
        else:
            with pytest.raises(exc):
                write_artifact(target, *_version(*source, "new"))
    assert _tag(target) == expected  # read_artifact puts back an artifact moved aside
    write_artifact(target, *_version(*source, "newer"))  # the next save removes what the failed one left
    assert _tag(target) == "newer" and _listing(tmp_path) == ["art"]


# (use the atomic swap?, object and attribute, call number, crash before or after it, tags allowed afterwards)
CRASHES = [
    (True, (art, "save_file"), 1, "before", {"old"}),
    (True, (atomic, "_exchange"), 1, "before", {"old"}),
    (True, (atomic, "_exchange"), 1, "after", {"new"}),
    (False, (os, "replace"), 1, "before", {"old"}),
    (False, (os, "replace"), 1, "after", {"old"}),  # old moved aside, new not yet in place
    (False, (os, "replace"), 2, "after", {"new"}),
]


@pytest.mark.parametrize(
    "case", CRASHES, ids=[f"{'swap' if c[0] else 'no-swap'}-{c[1][1]}-{c[2]}-{c[3]}" for c in CRASHES]
)
def test_a_killed_save_leaves_the_old_or_the_new_artifact(source, tmp_path, case):
    """The save runs in a forked child that dies (``os._exit``: no cleanup, no ``except``) at one step."""
    swap, (owner, attr), nth, when, allowed = case
    target = write_artifact(tmp_path / "art", *_version(*source, "old"))
    pid = os.fork()
    if pid == 0:  # child: never returns to pytest
        try:
            real, calls = getattr(owner, attr), {"n": 0}

            def crashing(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == nth and when == "before":
                    os._exit(17)
                out = real(*args, **kwargs)
                if calls["n"] == nth:
                    os._exit(17)
                return out

            if not swap:
                atomic._exchange = lambda a, b: False
            setattr(owner, attr, crashing)
            write_artifact(target, *_version(*source, "new"))
        finally:
            os._exit(0)  # reached only if the crash point was never hit
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17
    assert _tag(target) in allowed
    write_artifact(target, *_version(*source, "newer"))
    assert _tag(target) == "newer" and _listing(tmp_path) == ["art"]


def test_first_save_that_fails_leaves_nothing(source, tmp_path, monkeypatch):
    monkeypatch.setattr(art, "save_file", _fail(exc=KeyboardInterrupt)(art.save_file))
    with pytest.raises(KeyboardInterrupt):
        write_artifact(tmp_path / "art", *_version(*source, "new"))
    assert _listing(tmp_path) == []


def test_save_refuses_an_invalid_config_before_writing(source, tmp_path):
    config, tensors = _version(*source, "x")
    config["budgets"] = [64, 32]
    with pytest.raises(ValueError, match=r"cannot write artifact .*art: budgets must be a non-empty increasing list"):
        write_artifact(tmp_path / "art", config, tensors)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file is a file, not an artifact folder"):
        write_artifact(tmp_path / "file", *_version(*source, "x"))
    assert _listing(tmp_path) == ["file"]


def test_a_file_is_not_an_artifact_folder(tmp_path):
    (tmp_path / "polykv.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match=r"polykv.json is a file, not an artifact folder"):
        PolyKV.from_pretrained(tmp_path / "polykv.json")


# --- validation of every field --------------------------------------------------------------------------------------
def _set(config, path, value):
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


DELETE = object()
F = len(feature_names(["snapkv", "streaming"]))  # the features of make_artifact
CONFIG_CASES = [
    ("policies", "streaming", "policies must be a list of policy names, got a string ('streaming')"),
    ("policies", [], "policies must name at least one policy, got an empty list"),
    ("policies", ["snapkv", "nope"], "policies[1] is the unknown policy 'nope'; known policies: "),
    ("policies", ["snapkv", "random"], "policies[1] 'random' is a control policy, not a routable one"),
    ("policies", ["snapkv", "snapkv"], "policies must name each policy once"),
    ("policies", DELETE, "policies must be a list of policy names, got nothing (the key is missing)"),
    ("overlap_policies", "snapkv", "overlap_policies must be a list of policy names, got a string"),
    ("model", [1], "model must be an object, got a list of 1 item"),
    ("model.name", "", "model.name must be a non-empty string, got a string ('')"),
    ("model.num_layers", "4", "model.num_layers must be an integer >= 1, got a string ('4')"),
    ("model.max_positions", 0, "model.max_positions must be an integer >= 1, got 0"),
    ("model.head_dim", 16.0, "model.head_dim must be an integer >= 1, got 16.0"),
    ("model.num_kv_heads", True, "model.num_kv_heads must be an integer >= 1, got true"),
    ("feature_names", [1, 2], "feature_names must be a non-empty list of strings, got a list of 2 items"),
    ("feature_names", ["entropy"], "feature_names must be the features of overlap_policies ['snapkv', 'streaming']"),
    ("scaler", DELETE, "scaler must be an object, got nothing (the key is missing)"),
    ("scaler.mean", [0.0] * 3, f"scaler.mean must be a list of {F} numbers, got a list of 3 items"),
    ("scaler.std", [-1.0] + [1.0] * (F - 1), "scaler.std[0] must be a finite number >= 0.0, got -1.0"),
    ("scaler.mean", [float("nan")] * F, "scaler.mean[0] must be a finite number, got nan"),
    ("router.type", "tree", "router.type must be 'mlp' or 'gbdt', got a string ('tree')"),
    ("router.hidden", 0, "router.hidden must be an integer >= 1, got 0"),
    ("router.num_hidden_layers", None, "router.num_hidden_layers must be an integer >= 0, got null"),
    ("allocator.hidden", "8", "allocator.hidden must be an integer >= 1, got a string ('8')"),
    ("allocator.num_hidden_layers", -1, "allocator.num_hidden_layers must be an integer >= 0, got -1"),
    ("b_min", 0, "b_min must be an integer >= 1, got 0"),
    ("capture.window", DELETE, "capture.window must be an integer >= 1, got nothing (the key is missing)"),
    ("capture.chunk", 0, "capture.chunk must be an integer >= 1, got 0"),
    ("budgets", [], "budgets must be a non-empty increasing list of integers >= 1, got an empty list"),
    ("budgets", [64, 32, 128], "budgets must be a non-empty increasing list of integers >= 1, got a list of 3 items"),
    ("budgets", [0, 32, 64], "budgets must be a non-empty increasing list of integers >= 1"),
    ("validation", [], "validation must be an object (budget -> method -> KL), got an empty list"),
    ("validation", {"x": {}}, "validation keys must be budgets (positive integers), got a string ('x')"),
    ("validation", {"32": {"learned": "low"}}, "validation['32']['learned'] must be a number or null"),
    ("training", "x", "training must be an object, got a string ('x')"),
    ("format", "polykv-learn/0", "format 'polykv-learn/0'; this version reads 'polykv-learn/1' and 'polykv-learn/2'"),
    ("router.type", "gbdt", "router.gbdt must be an object, got nothing (the key is missing)"),
]


@pytest.mark.parametrize("path,value,message", CONFIG_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CONFIG_CASES])
def test_every_config_field_is_checked_on_load(tiny, tmp_path, path, value, message):
    directory = make_artifact(tmp_path / "a", tiny)
    config = json.loads((directory / "polykv.json").read_text())
    _set(config, path, value)
    (directory / "polykv.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        PolyKV.from_pretrained(directory)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert text.startswith(f"corrupt artifact {directory}: ") or "has format" in text


def test_a_non_object_config_is_refused(tiny, tmp_path):
    directory = make_artifact(tmp_path / "a", tiny)
    for value, kind in (([1, 2], "a list of 2 items"), ("x", "a string ('x')"), (3, "3")):
        (directory / "polykv.json").write_text(json.dumps(value))
        with pytest.raises(ValueError, match=rf"^corrupt artifact {directory}: polykv.json must hold a JSON object, "):
            read_artifact(directory)
        with pytest.raises(ValueError) as info:
            read_artifact(directory)
        assert str(info.value).endswith(f"got {kind}")
    (directory / "polykv.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="polykv.json is not UTF-8 text"):
        read_artifact(directory)


def _edit_tensors(directory, edit):
    tensors = load_file(directory / "weights.safetensors")
    edit(tensors)
    save_file(tensors, directory / "weights.safetensors")


TENSOR_CASES = [
    (lambda t: t.__setitem__("calibration_features", torch.zeros(3, 5, F)),
     f"tensor calibration_features must have shape (3, 4, {F}), got (3, 5, {F})"),
    (lambda t: t.__setitem__("calibration_features", torch.zeros(2, 4, F)),
     f"tensor calibration_features must have shape (3, 4, {F}), got (2, 4, {F})"),
    (lambda t: t.pop("calibration_features"), "tensor calibration_features is missing from weights.safetensors"),
    (lambda t: t.pop("router.net.0.weight"), "tensor router.net.0.weight is missing"),
    (lambda t: t.pop("allocator.net.2.bias"), "tensor allocator.net.2.bias is missing"),
    (lambda t: t.__setitem__("router.net.0.weight", torch.zeros(8, F + 1)),
     f"tensor router.net.0.weight must have shape (8, {F}), got (8, {F + 1})"),
    (lambda t: t.__setitem__("router.net.6.weight", torch.zeros(1)), "has unexpected router tensors ['router.net.6"),
    (lambda t: t.__setitem__("router.net.0.bias", torch.full((8,), float("inf"))),
     "tensor router.net.0.bias must hold finite floating-point values"),
    (lambda t: t.__setitem__("calibration_features", torch.zeros(3, 4, F, dtype=torch.int64)),
     "tensor calibration_features must hold finite floating-point values (dtype torch.int64)"),
]  # fmt: skip


@pytest.mark.parametrize("edit,message", TENSOR_CASES)
def test_tensor_names_shapes_and_values_are_checked_on_load(tiny, tmp_path, edit, message):
    directory = make_artifact(tmp_path / "a", tiny)
    _edit_tensors(directory, edit)
    with pytest.raises(ValueError, match=f"^corrupt artifact {directory}: ") as info:
        PolyKV.from_pretrained(directory)
    assert message in str(info.value)


def test_router_shape_must_match_its_config(tiny, tmp_path):
    directory = make_artifact(tmp_path / "a", tiny)
    config = json.loads((directory / "polykv.json").read_text())
    config["router"]["hidden"] = 16
    (directory / "polykv.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"tensor router.net.0.weight must have shape \(16, {F}\), got \(8, {F}\)"):
        PolyKV.from_pretrained(directory)


# --- GBDT router ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def gbdt_artifact(tiny, tmp_path):
    from polykv_learn.planner.router import GBDTRouter

    directory = make_artifact(tmp_path / "g", tiny)
    config, tensors = read_artifact(directory)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, F))
    labels = np.where(x[:, 0] > 0.3, "snapkv", np.where(x[:, 1] > 0, "streaming", "knorm"))
    router = GBDTRouter(max_iter=3, max_depth=2).fit(x, labels)
    arrays, meta = router.to_state()
    tensors.update({f"gbdt.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    config["router"] = {**config["router"], "type": "gbdt", "gbdt": meta}
    config.pop("format")
    return write_artifact(directory, config, tensors), router, x


def test_gbdt_artifact_loads_and_predicts_like_the_router(gbdt_artifact):
    directory, router, x = gbdt_artifact
    loaded = PolyKV.from_pretrained(directory)
    assert loaded.planner.gbdt.predict(x) == router.predict(x)


GBDT_CASES = [
    ("router.gbdt.loss", "ranking", "router.gbdt.loss must be 'binary' or 'multiclass' or 'constant'"),
    ("router.gbdt.classes", ["snapkv", "h2o", "knorm"], "router.gbdt.classes must be routed policies"),
    ("router.gbdt.num_features", 3, f"router.gbdt.num_features must be {F} (the feature count), got 3"),
    ("router.gbdt.format", "v0", "router.gbdt.format must be 'polykv-gbdt-v1', got a string ('v0')"),
]


@pytest.mark.parametrize("path,value,message", GBDT_CASES)
def test_gbdt_fields_are_checked(gbdt_artifact, path, value, message):
    directory = gbdt_artifact[0]
    config = json.loads((directory / "polykv.json").read_text())
    _set(config, path, value)
    (directory / "polykv.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^corrupt artifact {directory}: ") as info:
        PolyKV.from_pretrained(directory)
    assert message in str(info.value)


def _self_loop(t):
    left = t["gbdt.nodes.left"].clone()
    leaf = t["gbdt.nodes.is_leaf"].bool()
    first_split = int((~leaf).nonzero()[0])
    left[first_split] = first_split - int(t["gbdt.tree_offsets"][t["gbdt.tree_offsets"] <= first_split][-1])
    t["gbdt.nodes.left"] = left  # a node that is its own child: the tree walk would never end


GBDT_TENSOR_CASES = [
    (_self_loop, "tensor gbdt.nodes.left must point to later nodes of the same tree"),
    (lambda t: t.__setitem__("gbdt.nodes.feature_idx", torch.where(t["gbdt.nodes.is_leaf"].bool(),
     t["gbdt.nodes.feature_idx"], F)), f"tensor gbdt.nodes.feature_idx must be in [0, {F}) at split nodes"),
    (lambda t: t.__setitem__("gbdt.tree_offsets", t["gbdt.tree_offsets"][:-1]),
     "tensor gbdt.tree_offsets must rise from 0 to the node count"),
    (lambda t: t.__setitem__("gbdt.nodes.value", t["gbdt.nodes.value"][:-1]),
     "the gbdt.nodes.* tensors must all have the same length"),
    (lambda t: t.pop("gbdt.baseline"), "tensor gbdt.baseline is missing"),
]  # fmt: skip


@pytest.mark.parametrize("edit,message", GBDT_TENSOR_CASES)
def test_gbdt_arrays_are_checked(gbdt_artifact, edit, message):
    directory = gbdt_artifact[0]
    _edit_tensors(directory, edit)
    with pytest.raises(ValueError, match=f"^corrupt artifact {directory}: ") as info:
        PolyKV.from_pretrained(directory)
    assert message in str(info.value)


def test_evaluation_offers_polykv_gbdt_only_for_a_gbdt_artifact(gbdt_artifact, tiny, tmp_path):
    from polykv_learn.eval.methods import available_methods

    directory, _, _ = gbdt_artifact
    gbdt = PolyKV.from_pretrained(directory)
    assert "polykv-gbdt" in available_methods(None, gbdt)
    mlp = PolyKV.from_pretrained(make_artifact(tmp_path / "mlp", tiny))
    with pytest.raises(ValueError, match="the --gbdt-router artifact has an MLP router, not a GBDT one"):
        available_methods(None, mlp)
