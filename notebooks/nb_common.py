"""Shared set-up of the notebooks: the mode (tiny / smollm2), the router artifact, the data and the cached prefills.

- ``tiny``: a tiny random Llama (``tiny-llama``). A small generated corpus is written to a work folder
  (``$POLYKV_NOTEBOOK_WORKDIR``, default ``<tmp>/polykv-notebooks-tiny``) and a router is trained there with exactly
  ``polykv-learn fit --config configs/tiny.yaml`` (reused by later notebooks while it is present).
- ``smollm2``: the shipped router ``checkpoints/smollm2-135m`` and the data it was trained on
  (``configs/smollm2-135m.yaml``: ``data/polykv``, made by ``polykv-learn prepare-data``).

The environment variable ``POLYKV_NOTEBOOK_MODE`` overrides the mode set in a notebook's parameter cell.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MODES = ("tiny", "smollm2")
CONFIGS = {"tiny": REPO / "configs" / "tiny.yaml", "smollm2": REPO / "configs" / "smollm2-135m.yaml"}
SHIPPED_ROUTER = REPO / "checkpoints" / "smollm2-135m"

#: layer-signal groups of :mod:`polykv_learn.features`, by column-name prefix (used by the ablations)
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "attention statistics": (
        "entropy",
        "sink_mass",
        "recent_mass",
        "coverage@",
        "temporal_variance",
    ),
    "keep-set overlaps": ("overlap:",),
    "key norms": ("key_norm_spread",),
    "context (depth, log n, B/n)": ("depth", "log_n", "budget_ratio"),
}


def resolve_mode(mode: str) -> str:
    """The notebook's ``MODE``, unless ``POLYKV_NOTEBOOK_MODE`` says otherwise."""
    mode = os.environ.get("POLYKV_NOTEBOOK_MODE", mode).strip().lower()
    if mode not in MODES:
        raise ValueError(f"MODE must be one of {MODES}, got {mode!r}")
    return mode


def group_columns(feature_names: list[str], group: str) -> list[int]:
    """Indices of the columns of ``feature_names`` that belong to ``FEATURE_GROUPS[group]``."""
    prefixes = FEATURE_GROUPS[group]
    return [i for i, name in enumerate(feature_names) if any(name.startswith(p) for p in prefixes)]


@dataclass
class Workspace:
    mode: str
    config: dict[str, Any]  # the fit config (YAML) the router was trained with
    artifact: Path  # the router folder
    data_dir: Path  # corpus/ and prefills/ (the prefill cache)
    model_name: str  # what load_model / the prefill cache know the model as
    workdir: Path | None = None  # tiny mode: where everything is written

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.config["data"])


def tiny_workdir() -> Path:
    default = Path(tempfile.gettempdir()) / "polykv-notebooks-tiny"
    return Path(os.environ.get("POLYKV_NOTEBOOK_WORKDIR", default)).resolve()


def write_tiny_corpus(data_dir: Path, train: int, validation: int, facts: int = 28, seed: int = 0) -> Path:
    """A small corpus of key-value facts with a question about one of them as the probe (corpus JSONL format)."""
    rng = random.Random(seed)
    for split, count in (("train", train), ("validation", validation)):
        rows = []
        for i in range(count):
            table = {f"key{rng.randrange(1000)}": rng.randrange(10_000) for _ in range(facts)}
            lines = [f"The value of {k} is {v}." for k, v in table.items()]
            target = rng.choice(list(table))
            rows.append(
                {
                    "id": f"{split}-{i}",
                    "source": "facts",
                    "context": "Facts follow. " + " ".join(lines),
                    "probe": f" Question: what is {target}? Answer: the value of {target} is {table[target]}.",
                }
            )
        path = data_dir / "corpus" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data_dir


def fit_command(workspace: Workspace, max_steps: int) -> list[str]:
    """The ``polykv-learn fit`` command line that trains the tiny router."""
    return [
        sys.executable,
        "-m",
        "polykv_learn.cli",
        "fit",
        "--config",
        str(CONFIGS["tiny"]),
        f"--data.data_dir={workspace.data_dir}",
        f"--model.export_dir={workspace.artifact}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.enable_progress_bar=false",
    ]


def _artifact_ok(workspace: Workspace) -> bool:
    from polykv_learn.deploy.polykv import PolyKV

    try:
        polykv = PolyKV.from_pretrained(workspace.artifact)
    except (FileNotFoundError, ValueError):
        return False
    return polykv.config.get("training", {}).get("data_dir") == str(workspace.data_dir)


def workspace(
    mode: str, fit_steps: int = 40, train_docs: int = 8, val_docs: int = 4, verbose: bool = True
) -> Workspace:
    """Everything a notebook needs for ``mode``; in tiny mode trains the router first unless one is present."""
    mode = resolve_mode(mode)
    config = yaml.safe_load(CONFIGS[mode].read_text())
    if mode == "smollm2":
        data_dir = Path(config["data"]["data_dir"])
        data_dir = data_dir if data_dir.is_absolute() else REPO / data_dir
        ws = Workspace(mode, config, SHIPPED_ROUTER, data_dir, config["model"]["model_name"])
        if not (ws.artifact / "polykv.json").exists():
            raise FileNotFoundError(
                f"{ws.artifact} is missing: train it with `polykv-learn fit --config configs/smollm2-135m.yaml` "
                "from the repository root, or run the notebook with MODE = 'tiny'"
            )
        if not (data_dir / "corpus" / "validation.jsonl").exists():
            raise FileNotFoundError(f"{data_dir}/corpus is missing: run `polykv-learn prepare-data --out {data_dir}`")
        return ws
    work = tiny_workdir()
    ws = Workspace(mode, config, work / "artifact", work / "data", config["model"]["model_name"], work)
    config["data"]["max_train_samples"] = train_docs
    config["data"]["max_val_samples"] = val_docs
    if not (ws.data_dir / "corpus" / "validation.jsonl").exists():
        write_tiny_corpus(ws.data_dir, train_docs, val_docs)
    if _artifact_ok(ws):
        if verbose:
            print(f"reusing the tiny router in {ws.artifact}")
        return ws
    cmd = fit_command(ws, fit_steps) + [
        f"--data.max_train_samples={train_docs}",
        f"--data.max_val_samples={val_docs}",
    ]
    if verbose:
        print("$ polykv-learn " + " ".join(cmd[3:]))
    work.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"polykv-learn fit failed:\n{out.stderr[-4000:]}")
    if verbose:
        print(f"trained in {work} -> {ws.artifact}")
    return ws


def datamodule(ws: Workspace, polykv: Any, max_val_samples: int | None = None):
    """The prefill data module of ``ws`` with the artifact's policies, features, budget grid and window, so that
    the prefills of training are reused (missing ones are built)."""
    from polykv_learn.learn.datamodule import PrefillDataModule

    data = ws.data
    dm = PrefillDataModule(
        data_dir=str(ws.data_dir),
        model_name=ws.model_name,
        policies=list(polykv.policies),
        overlap_policies=list(polykv.overlap_policies),
        budgets=list(polykv.budgets),
        max_context_tokens=data["max_context_tokens"],
        min_context_tokens=data["min_context_tokens"],
        probe_tokens=data["probe_tokens"],
        max_train_samples=data.get("max_train_samples"),
        max_val_samples=max_val_samples if max_val_samples is not None else data.get("max_val_samples"),
        window=int(polykv.capture.window),
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm
