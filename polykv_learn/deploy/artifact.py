"""The frozen artifact of a trained router: a folder with ``polykv.json`` and ``weights.safetensors``.

``polykv.json`` holds the format version, the model fingerprint (name, layers, heads, KV heads, head dim), the
routed and overlap policies, the feature names and standardisation statistics, the router/allocator shapes, the
capture options, the budget grid, the validation table, training notes and (format 2, optional) the calibrated
static plans of ``polykv-learn calibrate``. ``weights.safetensors`` holds the MLP
router and allocator weights, the calibration features of static plans, and (GBDT router) the tree node arrays.
Loading never executes code (no pickle) and checks every field and tensor shape (:func:`validate_config`).
Saving writes a temporary folder and swaps it into place in one step (:func:`polykv_learn.atomic.atomic_dir`).
See ``docs/artifact-format.md``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from polykv_learn import atomic
from polykv_learn.capture import RECONSTRUCT_SCOPES
from polykv_learn.features import feature_names as expected_feature_names
from polykv_learn.head_features import HEAD_FEATURE_NAMES
from polykv_learn.kvzip_global import ALLOCATION_PRIORS
from polykv_learn.planner.router import GBDT_FORMAT, NODE_FIELDS
from polykv_learn.policies import POLICIES

FORMAT = "polykv-learn/2"
#: formats this version reads: 1 (no calibrated plans) and 2 (adds the optional ``calibrated`` object)
READ_FORMATS = ("polykv-learn/1", FORMAT)
CONFIG_FILE = "polykv.json"
WEIGHTS_FILE = "weights.safetensors"
ROUTER_TYPES = ("mlp", "gbdt")
GBDT_LOSSES = ("binary", "multiclass", "constant")
MODEL_INT_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "max_positions")


def write_artifact(directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``tensors`` to ``directory``, replacing an existing artifact in one atomic swap.

    Both are validated first (:func:`validate_config`), so a save never produces an artifact that cannot be
    loaded. A crash at any point leaves the old or the new artifact at ``directory``; leftovers of an earlier
    crashed save of the same artifact are removed. A ``README.md`` (model card) in the old folder is kept.
    Files and folders get the permissions the process umask allows."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not an artifact folder")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    full = {"format": FORMAT, **config}
    validate_config(full, tensors, directory, problem="cannot write artifact")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(directory)
    with atomic.atomic_dir(directory) as tmp:
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(full, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / WEIGHTS_FILE)
        os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~atomic.current_umask())  # safetensors creates it 0600
        for extra in ("README.md",):
            if (directory / extra).is_file():
                shutil.copyfile(directory / extra, tmp / extra)  # keep a model card written next to it
    return directory


def _remove_leftovers(directory: Path) -> None:
    """Put back an artifact a crashed save left moved aside, then delete the temporary folders of earlier saves of
    this artifact (``.<name>.tmp-*``, ``.<name>.old-*``, see :mod:`polykv_learn.atomic`)."""
    atomic.recover_dir(directory)
    if not directory.exists():
        return  # nothing to protect: do not delete an old copy recover_dir could not move back
    for mark in (atomic.TMP_MARK, atomic.OLD_MARK):
        for entry in directory.parent.glob(f".{_glob_escape(directory.name)}{mark}*"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def read_artifact(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an artifact folder; errors name the missing file or the broken field.

    Raises ``FileNotFoundError`` (no folder, missing file), ``NotADirectoryError`` (a file was given) or
    ``ValueError("corrupt artifact DIR: ...")`` (anything :func:`validate_config` refuses)."""
    directory = Path(directory)
    try:
        atomic.recover_dir(directory)  # a save interrupted between its two renames (no atomic swap available)
    except OSError:
        pass  # read-only checkout: report what is there
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not an artifact folder")
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a polykv-learn artifact folder (it does not exist)")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"incomplete artifact {directory}: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"corrupt artifact {directory}: {CONFIG_FILE} is not UTF-8 text ({err.reason})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt artifact {directory}: {CONFIG_FILE} is not valid JSON ({err})") from err
    if isinstance(config, dict) and config.get("format") not in READ_FORMATS:
        readable = " and ".join(repr(f) for f in READ_FORMATS)
        raise ValueError(f"{config_path} has format {config.get('format')!r}; this version reads {readable}")
    try:
        tensors = load_file(weights_path)
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise ValueError(f"corrupt artifact {directory}: {WEIGHTS_FILE} cannot be read ({err})") from err
    validate_config(config, tensors, directory)
    return config, tensors


# --- validation ----------------------------------------------------------------------------------------------------
class _Invalid(Exception):
    """One broken field; :func:`validate_config` turns it into ``ValueError("corrupt artifact DIR: ...")``."""


_MISSING = object()


def _kind(value: Any) -> str:
    """How a JSON value is described in messages: numbers by value, everything else by type."""
    if value is _MISSING:
        return "nothing (the key is missing)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"a string ({value!r})" if len(value) <= 40 else "a string"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}" if value else "an empty list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _expect(ok: bool, field: str, expected: str, value: Any) -> None:
    if not ok:
        raise _Invalid(f"{field} must be {expected}, got {_kind(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _object(parent: Mapping[str, Any], key: str, field: str) -> dict[str, Any]:
    value = parent.get(key, _MISSING)
    _expect(isinstance(value, dict), field, "an object", value)
    return value


def _int(parent: Mapping[str, Any], key: str, field: str, minimum: int) -> int:
    value = parent.get(key, _MISSING)
    _expect(_is_int(value) and value >= minimum, field, f"an integer >= {minimum}", value)
    return value


def _policy_list(value: Any, field: str, routable: bool, allow_empty: bool) -> list[str]:
    _expect(isinstance(value, list), field, "a list of policy names", value)
    if not value and not allow_empty:
        raise _Invalid(f"{field} must name at least one policy, got an empty list")
    for i, name in enumerate(value):
        _expect(isinstance(name, str), f"{field}[{i}]", "a policy name (a string)", name)
        if name not in POLICIES:
            raise _Invalid(f"{field}[{i}] is the unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
        if routable and not POLICIES[name].routable:
            raise _Invalid(f"{field}[{i}] {name!r} is a control policy, not a routable one")
    if len(set(value)) != len(value):
        raise _Invalid(f"{field} must name each policy once, got {value}")
    return value


def _number_list(parent: Mapping[str, Any], key: str, field: str, length: int, minimum: float | None) -> None:
    value = parent.get(key, _MISSING)
    what = f"a list of {length} numbers" + (f" >= {minimum}" if minimum is not None else "")
    _expect(isinstance(value, list) and len(value) == length, field, what, value)
    for i, x in enumerate(value):
        ok = _is_number(x) and math.isfinite(x) and (minimum is None or x >= minimum)
        _expect(ok, f"{field}[{i}]", "a finite number" + (f" >= {minimum}" if minimum is not None else ""), x)


def validate_config(
    config: Any, tensors: Mapping[str, torch.Tensor], directory: str | Path, problem: str = "corrupt artifact"
) -> None:
    """Check every field of ``polykv.json`` and every tensor ``PolyKV`` uses (names, types, ranges, shapes);
    raise ``ValueError("<problem> DIR: <field> must be <expected>, got <what it is>")`` on the first problem."""
    if not isinstance(config, dict):
        raise ValueError(f"{problem} {directory}: {CONFIG_FILE} must hold a JSON object, got {_kind(config)}")
    try:
        _validate(config, tensors)
    except _Invalid as err:
        raise ValueError(f"{problem} {directory}: {err}") from None


def _validate(config: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    fmt = config.get("format", _MISSING)
    _expect(fmt in READ_FORMATS, "format", " or ".join(repr(f) for f in READ_FORMATS), fmt)
    model = _object(config, "model", "model")
    name = model.get("name", _MISSING)
    _expect(isinstance(name, str) and name != "", "model.name", "a non-empty string", name)
    dims = {key: _int(model, key, f"model.{key}", 1) for key in MODEL_INT_FIELDS}
    policies = _policy_list(config.get("policies", _MISSING), "policies", routable=True, allow_empty=False)
    overlap = _policy_list(config.get("overlap_policies", _MISSING), "overlap_policies", False, allow_empty=True)
    names = config.get("feature_names", _MISSING)
    _expect(isinstance(names, list) and names and all(isinstance(n, str) for n in names), "feature_names",
            "a non-empty list of strings", names)  # fmt: skip
    prior = config.get("allocation_prior")
    _expect(prior is None or prior in ALLOCATION_PRIORS, "allocation_prior",
            f"null or one of {', '.join(ALLOCATION_PRIORS)}", prior)  # fmt: skip
    expected = expected_feature_names(overlap, prior)
    if names != expected:
        raise _Invalid(
            f"feature_names must be the features of overlap_policies {overlap} and allocation_prior {prior!r}: "
            f"{expected}, got {names}"
        )
    num_features = len(names)
    scaler = _object(config, "scaler", "scaler")
    _number_list(scaler, "mean", "scaler.mean", num_features, None)
    _number_list(scaler, "std", "scaler.std", num_features, 0.0)
    router = _object(config, "router", "router")
    kind = router.get("type", _MISSING)
    _expect(kind in ROUTER_TYPES, "router.type", " or ".join(repr(t) for t in ROUTER_TYPES), kind)
    r_hidden = _int(router, "hidden", "router.hidden", 1)
    r_layers = _int(router, "num_hidden_layers", "router.num_hidden_layers", 0)
    allocator = _object(config, "allocator", "allocator")
    a_hidden = _int(allocator, "hidden", "allocator.hidden", 1)
    a_layers = _int(allocator, "num_hidden_layers", "allocator.num_hidden_layers", 0)
    a_prior = allocator.get("prior")
    want = None if prior is None else names.index(prior)
    _expect(a_prior == want, "allocator.prior", f"{want} (the allocation prior's feature column)", a_prior)
    _int(config, "b_min", "b_min", 1)
    capture = _object(config, "capture", "capture")
    for key in ("window", "future", "chunk"):
        _int(capture, key, f"capture.{key}", 1)
    _validate_scope(capture)
    budgets = config.get("budgets", _MISSING)
    ok = isinstance(budgets, list) and budgets and all(_is_int(b) and b >= 1 for b in budgets)
    ok = ok and all(a < b for a, b in zip(budgets, budgets[1:], strict=False))
    _expect(bool(ok), "budgets", "a non-empty increasing list of integers >= 1", budgets)
    _validate_validation(config.get("validation", {}))
    training = config.get("training", {})
    _expect(isinstance(training, dict), "training", "an object", training)
    if "calibrated" in config:
        _expect(fmt != "polykv-learn/1", "calibrated", f"absent in format 'polykv-learn/1' (it needs {FORMAT!r})",
                config["calibrated"])  # fmt: skip
        _validate_calibrated(config["calibrated"], dims["num_layers"], dims["max_positions"])

    _validate_heads(config, tensors)
    _check_mlp(tensors, "router", num_features, r_hidden, r_layers, len(policies))
    _check_mlp(tensors, "allocator", num_features, a_hidden, a_layers, 1, prior=want is not None)
    _check_tensor(tensors, "calibration_features", (len(budgets), dims["num_layers"], num_features))
    if kind == "gbdt":
        _check_gbdt(_object(router, "gbdt", "router.gbdt"), tensors, policies, num_features)


def _validate_scope(capture: dict[str, Any]) -> None:
    """The optional reconstruction-scope keys of ``capture`` (absent: ``full``, every artifact made before them)."""
    scope = capture.get("reconstruct_scope", "full")
    allowed = " or ".join(repr(s) for s in RECONSTRUCT_SCOPES)
    _expect(scope in RECONSTRUCT_SCOPES, "capture.reconstruct_scope", f"absent, {allowed}", scope)
    if "reconstruct_context_chunk" in capture:
        _int(capture, "reconstruct_context_chunk", "capture.reconstruct_context_chunk", 1)
    if "reconstruct_sinks" in capture:
        _int(capture, "reconstruct_sinks", "capture.reconstruct_sinks", 0)


def _validate_heads(config: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """``head_allocation`` (absent: none; ``adakv``: AdaKV's split at deployment; ``learned``: the artifact holds a
    head allocator, ``head_allocator`` / ``head_scaler`` and the ``head_allocator.*`` tensors; otherwise none)."""
    how = config.get("head_allocation")
    _expect(how in (None, "learned", "adakv"), "head_allocation", "absent, 'learned' or 'adakv'", how)
    if how != "learned":
        for key in ("head_allocator", "head_scaler"):
            _expect(key not in config, key, "absent unless head_allocation is 'learned'", config.get(key))
        extra = sorted(k for k in tensors if k.startswith("head_allocator."))
        if extra:
            raise _Invalid(f"{WEIGHTS_FILE} has head_allocator tensors {extra} but head_allocation is {how!r}")
        return
    head = _object(config, "head_allocator", "head_allocator")
    hidden = _int(head, "hidden", "head_allocator.hidden", 1)
    layers = _int(head, "num_hidden_layers", "head_allocator.num_hidden_layers", 0)
    names = head.get("feature_names", _MISSING)
    _expect(names == HEAD_FEATURE_NAMES, "head_allocator.feature_names", f"{HEAD_FEATURE_NAMES}", names)
    scaler = _object(config, "head_scaler", "head_scaler")
    _number_list(scaler, "mean", "head_scaler.mean", len(HEAD_FEATURE_NAMES), None)
    _number_list(scaler, "std", "head_scaler.std", len(HEAD_FEATURE_NAMES), 0.0)
    _check_mlp(tensors, "head_allocator", len(HEAD_FEATURE_NAMES), hidden, layers, 1)


def _validate_validation(table: Any) -> None:
    _expect(isinstance(table, dict), "validation", "an object (budget -> method -> KL)", table)
    for budget, row in table.items():
        _expect(budget.isdigit() and int(budget) >= 1, "validation keys", "budgets (positive integers)", budget)
        _expect(isinstance(row, dict), f"validation[{budget!r}]", "an object (method -> KL)", row)
        for method, value in row.items():
            _expect(value is None or _is_number(value), f"validation[{budget!r}][{method!r}]", "a number or null",
                    value)  # fmt: skip


def _validate_calibrated(section: Any, num_layers: int, max_positions: int) -> None:
    """The calibrated static plans: ``context_length`` n (the calibration contexts' length, <= max_positions),
    ``b_min``, ``plans`` (budget B -> {policies, budgets}: L registered policies and L integer budgets in
    ``[min(b_min, B), n]`` summing to exactly ``L * B``) and ``calibration`` (an object, information only)."""
    _expect(isinstance(section, dict), "calibrated", "an object", section)
    n = _int(section, "context_length", "calibrated.context_length", 1)
    if n > max_positions:
        raise _Invalid(f"calibrated.context_length must be <= model.max_positions ({max_positions}), got {n}")
    b_min = _int(section, "b_min", "calibrated.b_min", 1)
    plans = section.get("plans", _MISSING)
    _expect(isinstance(plans, dict) and bool(plans), "calibrated.plans", "a non-empty object (budget -> plan)", plans)
    for key, plan in plans.items():
        ok = key.isdigit() and 1 <= int(key) <= n and str(int(key)) == key
        _expect(ok, "calibrated.plans keys", f"budgets (integers in [1, {n}], as strings)", key)
        field, budget = f"calibrated.plans[{key!r}]", int(key)
        _expect(isinstance(plan, dict), field, "an object with policies and budgets", plan)
        names = plan.get("policies", _MISSING)
        _expect(isinstance(names, list) and len(names) == num_layers, f"{field}.policies",
                f"a list of {num_layers} policy names", names)  # fmt: skip
        for i, name in enumerate(names):
            if not isinstance(name, str) or name not in POLICIES:
                raise _Invalid(f"{field}.policies[{i}] must be a registered policy ({', '.join(POLICIES)}), "
                               f"got {_kind(name)}")  # fmt: skip
        budgets = plan.get("budgets", _MISSING)
        lower = min(b_min, budget)
        ok = isinstance(budgets, list) and len(budgets) == num_layers
        ok = ok and all(_is_int(b) and lower <= b <= n for b in budgets)
        _expect(ok, f"{field}.budgets", f"a list of {num_layers} integers in [{lower}, {n}]", budgets)
        if sum(budgets) != num_layers * budget:
            raise _Invalid(f"{field}.budgets must sum to L * B = {num_layers * budget}, got {sum(budgets)}")
    info = section.get("calibration", {})
    _expect(isinstance(info, dict), "calibrated.calibration", "an object", info)


def _check_tensor(tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> None:
    if key not in tensors:
        raise _Invalid(f"tensor {key} is missing from {WEIGHTS_FILE}")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise _Invalid(f"tensor {key} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise _Invalid(f"tensor {key} must hold finite floating-point values (dtype {t.dtype})")


def _check_mlp(
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    inputs: int,
    hidden: int,
    layers: int,
    out: int,
    prior: bool = False,
) -> None:
    """The tensors of ``nn.Sequential`` Linear/GELU stacks (``router.MLPRouter``, ``allocator.BudgetAllocator``),
    and with ``prior`` the allocator's scalar prior gain and scale."""
    expected: dict[str, tuple[int, ...]] = {}
    if prior:
        expected.update({f"{prefix}.prior_gain": (), f"{prefix}.prior_scale": ()})
    width = inputs
    for i in range(layers + 1):
        size = hidden if i < layers else out
        expected[f"{prefix}.net.{2 * i}.weight"] = (size, width)
        expected[f"{prefix}.net.{2 * i}.bias"] = (size,)
        width = size
    for key, shape in expected.items():
        _check_tensor(tensors, key, shape)
    extra = sorted(k for k in tensors if k.startswith(f"{prefix}.") and k not in expected)
    if extra:
        raise _Invalid(f"{WEIGHTS_FILE} has unexpected {prefix} tensors {extra} (expected {sorted(expected)})")


def _check_gbdt(meta: dict[str, Any], tensors: Mapping[str, torch.Tensor], policies: list[str], features: int) -> None:
    """The GBDT router's description (``router.gbdt``) and node arrays: consistent sizes, and children that point to
    later nodes of the same tree (so every walk from a root ends in a leaf)."""
    _expect(meta.get("format", _MISSING) == GBDT_FORMAT, "router.gbdt.format", repr(GBDT_FORMAT), meta.get("format"))
    loss = meta.get("loss", _MISSING)
    _expect(loss in GBDT_LOSSES, "router.gbdt.loss", " or ".join(repr(x) for x in GBDT_LOSSES), loss)
    classes = _policy_list(meta.get("classes", _MISSING), "router.gbdt.classes", True, allow_empty=False)
    if not set(classes) <= set(policies):
        raise _Invalid(f"router.gbdt.classes must be routed policies {policies}, got {classes}")
    count = {"binary": 2, "constant": 1}.get(loss, max(3, len(classes)))
    if len(classes) != count:
        raise _Invalid(f"router.gbdt.classes must hold {count} policies for loss {loss!r}, got {len(classes)}")
    got = meta.get("num_features", _MISSING)
    _expect(got == features and _is_int(got), "router.gbdt.num_features", f"{features} (the feature count)", got)
    per_iteration = _int(meta, "trees_per_iteration", "router.gbdt.trees_per_iteration", 0)
    params = meta.get("params", {})
    _expect(isinstance(params, dict), "router.gbdt.params", "an object", params)
    arrays = {}
    for key in [f"nodes.{f}" for f in NODE_FIELDS] + ["tree_offsets", "baseline"]:
        if f"gbdt.{key}" not in tensors:
            raise _Invalid(f"tensor gbdt.{key} is missing from {WEIGHTS_FILE}")
        arrays[key] = tensors[f"gbdt.{key}"].numpy()
        if arrays[key].ndim != 1:
            raise _Invalid(f"tensor gbdt.{key} must be 1-D, got shape {arrays[key].shape}")
    n = len(arrays["nodes.feature_idx"])
    if any(len(arrays[f"nodes.{f}"]) != n for f in NODE_FIELDS):
        raise _Invalid("the gbdt.nodes.* tensors must all have the same length (one entry per node)")
    offsets = arrays["tree_offsets"].astype(np.int64)
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 1):
        raise _Invalid(f"tensor gbdt.tree_offsets must rise from 0 to the node count {n} (non-empty trees)")
    if len(arrays["baseline"]) < max(per_iteration, 1):
        raise _Invalid(f"tensor gbdt.baseline must hold at least {max(per_iteration, 1)} values")
    inner = ~arrays["nodes.is_leaf"].astype(bool)
    local = np.arange(n) - np.repeat(offsets[:-1], np.diff(offsets))  # index of each node within its tree
    size = np.repeat(np.diff(offsets), np.diff(offsets))
    for side in ("left", "right"):
        child = arrays[f"nodes.{side}"].astype(np.int64)
        if np.any(inner & ((child <= local) | (child >= size))):
            raise _Invalid(f"tensor gbdt.nodes.{side} must point to later nodes of the same tree")
    feature = arrays["nodes.feature_idx"].astype(np.int64)
    if np.any(inner & ((feature < 0) | (feature >= features))):
        raise _Invalid(f"tensor gbdt.nodes.feature_idx must be in [0, {features}) at split nodes")
