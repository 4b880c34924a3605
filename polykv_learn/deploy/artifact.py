"""The frozen artifact of a trained router: a folder with ``polykv.json`` and ``weights.safetensors``.

``polykv.json`` holds the format version, the model fingerprint (name, layers, heads, KV heads, head dim), the
routed and overlap policies, the feature names and standardisation statistics, the router/allocator shapes, the
capture options, the budget grid, the validation table and training notes. ``weights.safetensors`` holds the MLP
router and allocator weights, the calibration features of static plans, and (GBDT router) the tree node arrays.
Loading never executes code (no pickle). Saving writes a temporary folder and renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "polykv-learn/1"
CONFIG_FILE = "polykv.json"
WEIGHTS_FILE = "weights.safetensors"


def write_artifact(directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``tensors`` to ``directory`` atomically (replacing an existing artifact)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS_FILE)
        for extra in ("README.md",):
            if (directory / extra).exists():
                shutil.copy(directory / extra, tmp / extra)  # keep a model card written next to it
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}-old-", dir=directory.parent))
            os.replace(directory, old / "artifact")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_artifact(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an artifact folder; errors say which file is missing or broken."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a polykv-learn artifact folder (it does not exist)")
    for path in (config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"incomplete artifact {directory}: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt artifact {directory}: {CONFIG_FILE} is not valid JSON ({err})") from err
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} has format {config.get('format')!r}; this version reads {FORMAT!r}")
    try:
        tensors = load_file(weights_path)
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise ValueError(f"corrupt artifact {directory}: {WEIGHTS_FILE} cannot be read ({err})") from err
    return config, tensors


def export_learner(learner: Any, datamodule: Any, directory: str | Path) -> Path:
    """Freeze a trained :class:`~polykv_learn.learn.module.PolyKVLearner` into an artifact folder."""
    hp = learner.hparams
    tensors = {f"router.{k}": v for k, v in learner.router.state_dict().items()}
    tensors.update({f"allocator.{k}": v for k, v in learner.allocator.state_dict().items()})
    tensors["calibration_features"] = datamodule.calibration_features()  # (K, L, F) unscaled
    router: dict[str, Any] = {
        "type": hp.router,
        "hidden": learner.router.hidden,
        "num_hidden_layers": learner.router.num_hidden_layers,
    }
    if learner.gbdt is not None:
        arrays, meta = learner.gbdt.to_state()
        tensors.update({f"gbdt.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
        router["gbdt"] = meta
    opts = learner.simulator.capture_options
    config = {
        "model": learner.simulator.dims.to_dict(),
        "policies": list(learner.policies),
        "overlap_policies": list(hp.overlap_policies),
        "feature_names": list(learner.feature_names),
        "scaler": {"mean": learner.feature_mean.tolist(), "std": learner.feature_std.tolist()},
        "router": router,
        "allocator": {"hidden": learner.allocator.hidden, "num_hidden_layers": learner.allocator.num_hidden_layers},
        "b_min": hp.b_min,
        "capture": {"window": opts.window, "future": opts.future, "chunk": opts.chunk},
        "budgets": list(datamodule.budgets),
        "validation": {str(b): row for b, row in sorted(learner.validation_table.items())},
        "training": {
            "wall_time_s": round(time.time() - learner.fit_started_at, 1),
            "global_step": int(learner.global_step),
            "selected_step": learner.selected_step,
            "train_samples": len(datamodule.train_ids),
            "val_samples": len(datamodule.val_ids),
            "data_dir": str(datamodule.data_dir),
        },
    }
    path = write_artifact(directory, config, tensors)
    write_model_card(path)
    return path


def write_model_card(directory: str | Path, notes: str = "") -> Path:
    """Write ``README.md`` (the model card) of an artifact from its ``polykv.json``: model, policies, training
    data and steps, wall time, and the validation table (KL to the full cache on held-out documents)."""
    from polykv_learn.learn.module import describe_table

    directory = Path(directory)
    config, _ = read_artifact(directory)
    model, train = config["model"], config.get("training", {})
    table = {int(b): row for b, row in config.get("validation", {}).items()}
    wall = train.get("wall_time_s")
    lines = [
        f"# polykv-learn router for {model['name']}",
        "",
        f"- model: {model['name']} ({model['num_layers']} layers, {model['num_heads']} heads, "
        f"{model['num_kv_heads']} KV heads, head dim {model['head_dim']})",
        f"- routed policies: {', '.join(config['policies'])}; router: {config['router']['type']}",
        f"- layer features: {len(config['feature_names'])} ({', '.join(config['feature_names'])})",
        f"- training data: {train.get('train_samples')} training / {train.get('val_samples')} validation samples "
        f"from `{train.get('data_dir')}` (document-level split; see `polykv-learn prepare-data`)",
        f"- steps: {train.get('global_step')}"
        + (f" (exported: step {train['selected_step']}, best validation KL)" if train.get("selected_step") else "")
        + "; wall time: "
        + (f"{wall / 60:.1f} min (prefills included)" if wall else "not recorded"),
        "",
        "## Validation (hard plan, mean KL to the full cache on the probes of held-out documents; lower is better)",
        "",
        describe_table(table) if table else "(no validation was run)",
    ]
    if notes:
        lines += ["", notes]
    path = directory / "README.md"
    tmp = directory / ".README.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
