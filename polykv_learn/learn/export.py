"""Freezing a trained learner into an artifact (``polykv.json`` + ``weights.safetensors`` + ``README.md``).

At the end of ``fit`` the :class:`ExportRouter` callback (added by the learner when ``export_dir`` is set) calls
:func:`export_fit` on rank 0:
it takes the best checkpoint by ``val/kl_learned`` when a ``ModelCheckpoint`` monitors it, builds the artifact from
the learner's and the data module's public state (:func:`artifact_parts`), writes it with
:func:`polykv_learn.deploy.artifact.write_artifact` and writes the model card (:func:`write_model_card`).

Besides the fields of ``docs/artifact-format.md``, ``training`` records

- ``run_id``: the log version of the fit that exported (``version_N``, the folder its loggers write into; a
  resumed fit gets a version of its own), or ``run-<time>-<pid>`` when it had no logger;
- ``config_sha256``: :func:`config_sha256` of the learner's and the data module's arguments (the ``model`` and
  ``data`` sections of the resolved fit config; trainer options such as ``max_steps`` are not part of it);
- ``global_step``: optimizer steps of the whole training (all parts of a resumed fit);
- ``wall_time_s``: wall time of the whole training, every part of a resumed fit included
  (:meth:`PolyKVLearner.wall_time_s`, carried in the checkpoints);
- ``resumed``: how many times the training was resumed from a checkpoint.

An export into a folder holding the artifact of another run (another ``run_id``) prints one warning line naming
the run it replaces. Run ids are unique within one log folder (``<save_dir>/<name>``): two fits logging to
different folders can both be ``version_0``, and then replacing one's artifact by the other's is not noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from polykv_learn.atomic import atomic_write_text
from polykv_learn.capture import scope_fields
from polykv_learn.deploy.artifact import CONFIG_FILE, write_artifact
from polykv_learn.tables import describe_table

# The learner is a PolyKVLearner and the data module a PrefillDataModule (learn/module.py, learn/datamodule.py);
# the annotations name Lightning's base classes, as the learner's module imports this one.


def run_id(trainer: L.Trainer) -> str:
    """The log version of this fit (``version_N``, or the logger's own string), or a fresh id without loggers."""
    for logger in trainer.loggers:
        version = logger.version
        if version is not None:
            return f"version_{version}" if isinstance(version, int) else str(version)
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _public(hparams: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}  # not Lightning's _instantiator


def config_sha256(learner: L.LightningModule, datamodule: L.LightningDataModule) -> str:
    """SHA-256 of ``{"model": learner arguments, "data": data module arguments}`` as JSON with sorted keys and no
    spaces (``json.dumps(..., sort_keys=True, separators=(",", ":"))``; paths as strings)."""
    config = {"model": _public(learner.hparams), "data": _public(datamodule.hparams)}
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def artifact_parts(
    learner: L.LightningModule, datamodule: L.LightningDataModule, run: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``polykv.json`` content (without ``format``) and the tensors of the learner's artifact."""
    planner, tensors = learner.planner_state()  # policies, scaler, router, allocator, b_min (and a head allocator)
    tensors["calibration_features"] = datamodule.calibration_features()  # (K, L, F) unscaled
    opts = datamodule.capture_options
    config = {
        **planner,
        "model": learner.simulator.dims.to_dict(),
        "overlap_policies": list(learner.hparams.overlap_policies),
        "feature_names": list(learner.feature_names),
        **({"allocation_prior": learner.hparams.allocation_prior} if learner.hparams.allocation_prior else {}),
        **({"head_allocation": "adakv"} if learner.hparams.head_allocation == "adakv" else {}),  # learned: planner's
        "capture": {"window": opts.window, "future": opts.future, "chunk": opts.chunk, **scope_fields(opts)},
        "budgets": list(datamodule.budgets),
        "validation": {str(b): row for b, row in sorted(learner.validation_table.items())},
        "training": {
            "wall_time_s": round(learner.wall_time_s(), 1),
            "global_step": int(learner.global_step),
            "selected_step": learner.selected_step,
            "validated_at_step": learner.validated_at_step,
            "train_samples": len(datamodule.train_ids),
            "val_samples": len(datamodule.val_ids),
            "data_dir": str(datamodule.data_dir),
            "run_id": run,
            "config_sha256": config_sha256(learner, datamodule),
            "resumed": learner.resumed,
        },
    }
    return config, tensors


def previous_run(directory: str | Path) -> dict[str, Any] | None:
    """The ``training`` entry of the artifact in ``directory`` (None: no readable artifact there)."""
    try:
        config = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    training = config.get("training") if isinstance(config, dict) else None
    return training if isinstance(training, dict) else {}


def export_learner(
    learner: L.LightningModule, datamodule: L.LightningDataModule, directory: str | Path, run: str
) -> Path:
    """Write the artifact of ``learner`` (run ``run``) and its model card to ``directory``; warns in one line on
    stderr when that replaces the artifact of another run."""
    config, tensors = artifact_parts(learner, datamodule, run)
    before = previous_run(directory)
    if before is not None and before.get("run_id") != run:
        old = before.get("run_id")
        what = f"run {old}" if old else "a run without a run id"
        print(
            f"polykv-learn fit: warning: {directory} held the artifact of {what} (step {before.get('global_step')}, "
            f"data {before.get('data_dir')}); run {run} replaces it",
            file=sys.stderr,
        )
    path = write_artifact(directory, config, tensors)
    write_model_card(path, config)
    return path


def export_fit(learner: L.LightningModule, trainer: L.Trainer, directory: str | Path) -> Path:
    """The end-of-fit export: the best checkpoint's weights when one is selected on validation, then
    :func:`export_learner` with this fit's :func:`run_id`."""
    best = learner.best_checkpoint()
    if best is not None:  # model selection on the held-out validation KL of the hard plan
        learner.restore_selected(torch.load(best, map_location="cpu", weights_only=False))
    return export_learner(learner, trainer.datamodule, directory, run_id(trainer))


class ExportRouter(L.Callback):
    """Lightning callback: at the end of ``fit``, rank 0 freezes the learner into an artifact in ``directory``
    (:func:`export_fit`). The learner adds it itself when its ``export_dir`` is set (``configure_callbacks``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = directory

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            export_fit(pl_module, trainer, self.directory)


def write_model_card(directory: str | Path, config: dict[str, Any], notes: str = "") -> Path:
    """Write ``README.md`` (the model card) of the artifact in ``directory`` from its ``polykv.json`` content
    ``config``: model, policies, training data and steps, wall time, run, and the validation table."""
    model, train = config["model"], config.get("training", {})
    table = {int(b): row for b, row in config.get("validation", {}).items()}
    wall, resumed = train.get("wall_time_s"), train.get("resumed") or 0
    wall_text = "not recorded"
    if wall:
        parts = ["prefills included"] + ([f"{resumed} resume{'s' if resumed > 1 else ''}"] if resumed else [])
        wall_text = f"{wall / 60:.1f} min ({', '.join(parts)})"
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
        + f"; wall time: {wall_text}",
        f"- run: {train.get('run_id')}; config sha256: {train.get('config_sha256')}",
        "",
        "## Validation (hard plan, mean KL to the full cache on the probes of held-out documents; lower is better)",
        "",
        describe_table(table) if table else "(no validation was run)",
    ]
    if config.get("head_allocation"):  # after the layer features line
        how = {"learned": "learned head allocator on per-KV-head signals", "adakv": "AdaKV's split (not learned)"}
        lines.insert(6, f"- head allocation: {how[config['head_allocation']]}")
    if notes:
        lines += ["", notes]
    path = Path(directory) / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
