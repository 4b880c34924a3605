"""``polykv-learn fit`` / ``validate``: the Lightning CLI of :class:`PolyKVLearner` and :class:`PrefillDataModule`.

``run_fit(["fit", "--config", "configs/tiny.yaml", ...])`` (also ``python -m polykv_learn.learn.fitcli fit ...``)
parses the arguments with Lightning's CLI, with the model name and the policy sets of the learner linked to the
data module's. Before anything heavy happens:

1. the constructors check every field of the learner and the data module (one-line ``ValueError`` naming the
   field and what is allowed), then :meth:`PolyKVLearner.check_data` checks the pair (e.g. ``val_budgets`` must be
   budgets of ``data.budgets``) -- before any model load or prefill;
2. the fit claims its own log version: the smallest ``version_N`` above the existing ones that it can create (one
   atomic ``os.mkdir`` per logger folder, retried with ``N + 1`` when another fit got there first), so two fits
   started in one folder at the same time never share a log folder. Every configured CSV or TensorBoard logger
   without a ``version`` (and Lightning's default logger) gets that version; a logger with a ``version`` of its
   own, and any other kind of logger (e.g. Weights & Biases), is left as configured. The saved ``config.yaml``
   keeps the configured value (no version), so re-running it claims a new folder.

A resumed fit (``--ckpt_path last``) is a new run: it claims a new version, so the logs of the earlier parts stay
as they were; its artifact records the whole training (``training.wall_time_s``, ``global_step``, ``resumed``)
and its own ``run_id`` (see :mod:`polykv_learn.learn.export`).

Under DDP, processes started by Lightning for the other ranks take rank 0's version (passed on in the environment
as ``POLYKV_LOG_VERSION``) and claim nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI, instantiate_class
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from polykv_learn.learn.datamodule import PrefillDataModule
from polykv_learn.learn.module import PolyKVLearner

VERSION_ENV = "POLYKV_LOG_VERSION"
FILE_LOGGERS = (CSVLogger, TensorBoardLogger)  # loggers that write into <save_dir>/<name>/version_N
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
_VERSION_DIR = re.compile(r"version_(\d+)$")


def claim_version(roots: Sequence[str | os.PathLike[str]]) -> tuple[int, list[Path]]:
    """Create ``<root>/version_N`` in every root for the smallest ``N`` above the existing versions that no other
    process has created; returns ``N`` and the created folders. ``os.mkdir`` is atomic: of several processes
    creating one folder exactly one succeeds, and the others move on to ``N + 1``."""
    folders = sorted({Path(r).resolve() for r in roots})
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    taken = [int(m[1]) for f in folders for p in f.iterdir() if (m := _VERSION_DIR.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        made: list[Path] = []
        try:
            for folder in folders:  # the same order in every process, so the first folder decides
                (folder / f"version_{n}").mkdir()
                made.append(folder / f"version_{n}")
            return n, made
        except FileExistsError:
            for path in made:
                path.rmdir()
            n += 1


def global_rank_zero() -> bool:
    """Whether this process is rank 0 by the launchers' environment (no rank variable: a single process)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def _is_remote(path: str) -> bool:
    return "://" in path


class PolyKVCLI(LightningCLI):
    """The fit CLI; ``claimed`` collects the log folders this process created (removed again, if still empty,
    when the command fails)."""

    def __init__(self, *args: Any, claimed: list[Path] | None = None, **kwargs: Any) -> None:
        self.claimed: list[Path] = [] if claimed is None else claimed
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # one base model and one policy set for both the prefills and the learner
        parser.link_arguments("model.model_name", "data.model_name")
        parser.link_arguments("model.policies", "data.policies")
        parser.link_arguments("model.overlap_policies", "data.overlap_policies")
        parser.link_arguments("model.allocation_prior", "data.allocation_prior")
        parser.link_arguments("model.head_allocation", "data.head_allocation")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """After the constructors: check the learner against the data module, then give the loggers this run's
        version, then build the trainer."""
        self.model.check_data(self.datamodule)
        if "logger" not in kwargs:
            loggers = self._versioned_loggers()
            if loggers is not None:
                kwargs["logger"] = loggers
        return super().instantiate_trainer(**kwargs)

    def _section(self, config: Any) -> Any:
        return config[self.subcommand] if self.subcommand else config

    def _versioned_loggers(self) -> list[Any] | None:
        """The trainer's loggers with this run's version set on the ones without (None: nothing to change)."""
        entries = self._logger_entries()
        versionable = [
            i
            for i, (class_path, init, built) in enumerate(entries)
            if class_path and (built is None or isinstance(built, FILE_LOGGERS))  # None: the default logger
            and "version" in init and init["version"] is None
            and init.get("save_dir") and not _is_remote(str(init["save_dir"]))
        ]  # fmt: skip
        if not versionable:
            return None
        roots = [
            Path(entries[i][1]["save_dir"]) / (entries[i][1].get("name", "lightning_logs") or "") for i in versionable
        ]
        version = self._run_version(roots)
        if version is None:
            return None
        loggers = [built for _, _, built in entries]
        for i in versionable:
            class_path, init, _ = entries[i]
            loggers[i] = instantiate_class((), {"class_path": class_path, "init_args": {**init, "version": version}})
        return loggers

    def _logger_entries(self) -> list[tuple[str | None, dict[str, Any], Any]]:
        """(class path, init arguments, logger built by the CLI) of every logger the trainer would get."""
        trainer = self._section(self.config).trainer
        specs = trainer.logger
        if specs is False:
            return []
        if specs is None or specs is True:  # Lightning's default logger, made here so that it gets the version
            cls = TensorBoardLogger if any(_importable(m) for m in ("tensorboard", "tensorboardX")) else CSVLogger
            save_dir = str(trainer.default_root_dir or os.getcwd())
            return [(f"{cls.__module__}.{cls.__qualname__}", {"save_dir": save_dir, "version": None}, None)]
        built = self._section(self.config_init).trainer.logger
        if not isinstance(specs, list):
            specs, built = [specs], [built]
        return [
            (getattr(spec, "class_path", None), _as_dict(getattr(spec, "init_args", None)), logger)
            for spec, logger in zip(specs, built, strict=True)
        ]

    def _run_version(self, roots: list[Path]) -> int | None:
        """Rank 0 claims a version in the loggers' folders; the DDP processes it starts take it from the
        environment; other ranks leave the loggers as configured (None)."""
        if not global_rank_zero():
            value = os.environ.get(VERSION_ENV, "")
            return int(value) if value.isdigit() else None
        version, made = claim_version(roots)
        self.claimed.extend(made)
        os.environ[VERSION_ENV] = str(version)
        return version


def _as_dict(init_args: Any) -> dict[str, Any]:
    if init_args is None:
        return {}
    if hasattr(init_args, "as_dict"):
        return init_args.as_dict()
    return dict(init_args)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_fit(argv: list[str]) -> None:
    """Run ``polykv-learn fit|validate ARGS`` (``argv`` starts with the subcommand)."""
    previous = os.environ.get(VERSION_ENV)
    claimed: list[Path] = []
    try:
        PolyKVCLI(
            PolyKVLearner,
            PrefillDataModule,
            args=list(argv),  # parsed here, not from sys.argv
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "polykv-learn"},
            claimed=claimed,
        )
    except BaseException:
        for folder in claimed:  # a fit that failed before writing any log leaves no empty version folder
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    finally:
        if global_rank_zero():  # the version was for this run's own DDP processes only
            if previous is None:
                os.environ.pop(VERSION_ENV, None)
            else:
                os.environ[VERSION_ENV] = previous


if __name__ == "__main__":
    run_fit(sys.argv[1:])
