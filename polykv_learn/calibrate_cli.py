"""``polykv-learn calibrate --config FILE.yaml``: sensitivity curves, per-layer policies and budgets, as JSON.

The YAML file holds (defaults in :class:`CalibrateConfig`): ``model``, ``samples_file`` (JSON Lines in the sample
schema of ``polykv_learn.data.jsonl``), ``max_samples``, ``context_tokens`` (each context's first tokens),
``probe_tokens`` (question, answer prefix and first gold answer, cut to this many tokens), ``policies``, ``grid``
(the sweep's budgets), ``budgets`` (average budgets B of the plans), ``b_min``, ``out`` (the JSON file). Any field
can also be given as ``--field value`` after the config (a list as comma-separated values).

The output: the sweep's ``loss`` (layers x policies x grid), each layer's chosen policy, and per B the budgets
(``sum = L * B`` exactly, within ``[b_min, n]`` for the shortest calibration context ``n``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from polykv_learn.atomic import atomic_write_text


@dataclass
class CalibrateConfig:
    model: str = "smollm2-135m"
    samples_file: str = ""
    max_samples: int = 4
    context_tokens: int = 2048
    probe_tokens: int = 32
    policies: list[str] = field(default_factory=lambda: ["snapkv", "h2o", "tova", "knorm", "streaming"])
    grid: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024])
    budgets: list[int] = field(default_factory=lambda: [128, 256, 512])
    b_min: int = 16
    out: str = "results/calibrate.json"


def read_config(argv: Sequence[str]) -> CalibrateConfig:
    """``--config FILE`` then ``--field value`` overrides; unknown or ill-typed fields are one-line errors."""
    parser = argparse.ArgumentParser(prog="polykv-learn calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file with the fields of CalibrateConfig")
    for f in fields(CalibrateConfig):
        parser.add_argument(f"--{f.name}", default=None)
    args = parser.parse_args(list(argv))
    values: dict[str, object] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config}: expected a mapping of fields")
        unknown = sorted(set(loaded) - {f.name for f in fields(CalibrateConfig)})
        if unknown:
            raise ValueError(f"--config {args.config}: unknown fields {', '.join(unknown)}")
        values.update(loaded)
    for f in fields(CalibrateConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given.split(",") if f.name in ("policies", "grid", "budgets") else given
    config = CalibrateConfig(**values)
    return _checked(config)


def _checked(config: CalibrateConfig) -> CalibrateConfig:
    from polykv_learn.policies import policy_names

    try:
        ints = {n: int(getattr(config, n)) for n in ("max_samples", "context_tokens", "probe_tokens", "b_min")}
        grid, budgets = [int(b) for b in config.grid], [int(b) for b in config.budgets]
    except (TypeError, ValueError) as err:
        raise ValueError(f"integer fields need integers: {err}") from None
    if min(ints.values()) < 1 or not grid or not budgets or min(grid + budgets) < 1:
        raise ValueError("max_samples, context_tokens, probe_tokens, b_min, grid and budgets must be positive")
    unknown = sorted(set(config.policies) - set(policy_names()))
    if not config.policies or unknown:
        raise ValueError(f"policies must be known policy names; unknown: {', '.join(unknown) or '(none given)'}")
    if not config.samples_file or not Path(config.samples_file).is_file():
        raise FileNotFoundError(f"samples_file {config.samples_file!r}: no such file")
    return CalibrateConfig(
        model=config.model, samples_file=config.samples_file, policies=[str(p) for p in config.policies],
        grid=grid, budgets=budgets, out=config.out, **ints,
    )  # fmt: skip


def calibration_samples(config: CalibrateConfig, tokenizer) -> list[tuple]:
    """(context ids (1, n), probe ids (1, m)) of the first ``max_samples`` samples of ``samples_file``."""
    import torch

    from polykv_learn.data.jsonl import load_samples

    samples = load_samples(config.samples_file)[: config.max_samples]
    if not samples:
        raise ValueError(f"samples_file {config.samples_file}: no samples")
    pairs = []
    for sample in samples:
        context = tokenizer(sample["context"], add_special_tokens=False).input_ids[: config.context_tokens]
        probe_text = sample["question"] + sample.get("answer_prefix", "") + sample["answers"][0]
        probe = tokenizer(probe_text, add_special_tokens=False).input_ids[: config.probe_tokens]
        if not context or not probe:
            raise ValueError(f"sample {sample.get('id')}: empty context or probe after tokenisation")
        pairs.append((torch.tensor([context]), torch.tensor([probe])))
    return pairs


def run_calibrate(argv: Sequence[str]) -> dict:
    """The ``calibrate`` command: returns (and writes to ``out``) the JSON report."""
    config = read_config(argv)
    from polykv_learn.calibrate import allocate_budgets, choose_policies, sensitivity_curves
    from polykv_learn.models import load_model, load_tokenizer
    from polykv_learn.simulator import Simulator

    model, _ = load_model(config.model, with_tokenizer=False)
    samples = calibration_samples(config, load_tokenizer(config.model))
    n = min(context.shape[1] for context, _ in samples)
    for budget in config.budgets:
        if not min(config.b_min, n) <= budget <= n:
            raise ValueError(f"budget {budget} is outside [b_min, n] = [{min(config.b_min, n)}, {n}]")
    curves = sensitivity_curves(Simulator(model), samples, config.policies, config.grid)
    chosen = choose_policies(curves)
    chosen_loss = curves.loss[range(len(chosen)), [config.policies.index(p) for p in chosen]]  # (L, K)
    report = {
        "config": asdict(config),
        "context_length": n,
        "loss": curves.loss.tolist(),
        "layer_policies": chosen,
        "plans": {
            str(b): allocate_budgets(chosen_loss, config.grid, b, min(config.b_min, n), n) for b in config.budgets
        },
    }
    atomic_write_text(Path(config.out), json.dumps(report, indent=1) + "\n")
    return report
