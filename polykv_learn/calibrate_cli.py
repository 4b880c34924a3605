"""``polykv-learn calibrate --config FILE.yaml``: calibrated static plans (one per budget), as JSON and in an artifact.

The YAML file holds (defaults in :class:`CalibrateConfig`): ``model``; ``samples_file`` (a task file of
``prepare-data``, every used row of the ``train`` split), ``tasks`` (task types to take, empty: all),
``protocols`` (each sample laid out in one of them in turn, per task type: ``query_agnostic``, ``query_aware``, as
the fit's task rows), ``max_samples`` (round-robin over the task types), ``min_context_tokens`` /
``context_tokens`` (samples whose compressed prefix is outside this range are skipped), ``probe_tokens`` (the
prompt's tail and the gold answer, cut to this many tokens); ``policies``, ``grid`` (the sweep's budgets),
``budgets`` (the average budgets B of the plans), ``b_min``; ``baseline``: the other layers of the sensitivity
sweep at the ``full`` cache, at the ``uniform`` baseline (the best uniform policy at each B), or ``both`` (both
measured, the better plan on the calibration samples starts the refinement); ``refine_rounds`` (rounds of the joint
simulator search, 0: none); ``validation_file`` / ``validation_samples`` (optional: a ``validation``-split task
file on which the calibrated plans, the uniform policies and the router's own static plans are scored);
``router`` (an artifact folder) and ``artifact`` (a folder: the copy of ``router`` with the calibrated plans added,
artifact format 2); ``out`` (the JSON report). Any field can also be given as ``--field value`` after the config (a
list as comma-separated values).

Every plan has the exact total ``L * B`` with budgets in ``[min(b_min, B), n]``, ``n`` the shortest calibration
context. Losses are mean KL(full cache || plan) over the probe tokens (:mod:`polykv_learn.calibrate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from polykv_learn.atomic import atomic_write_text

BASELINES = ("full", "uniform", "both")
_LISTS = ("tasks", "protocols", "policies", "grid", "budgets")
_INTS = ("max_samples", "min_context_tokens", "context_tokens", "probe_tokens", "b_min", "validation_samples")


@dataclass
class CalibrateConfig:
    model: str = "smollm2-135m"
    samples_file: str = "data/polykv/tasks/train.jsonl"
    tasks: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=lambda: ["query_agnostic", "query_aware"])
    max_samples: int = 4
    min_context_tokens: int = 1
    context_tokens: int = 2048
    probe_tokens: int = 32
    policies: list[str] = field(default_factory=lambda: ["snapkv", "h2o", "tova", "knorm", "streaming"])
    grid: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024])
    budgets: list[int] = field(default_factory=lambda: [128, 256, 512])
    b_min: int = 16
    baseline: str = "full"
    refine_rounds: int = 0
    validation_file: str = ""
    validation_samples: int = 8
    router: str = ""
    artifact: str = ""
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
            values[f.name] = [x for x in given.split(",") if x] if f.name in _LISTS else given
    return _checked(CalibrateConfig(**values))


def _checked(config: CalibrateConfig) -> CalibrateConfig:
    from polykv_learn.learn.task_rows import TASK_PROTOCOLS
    from polykv_learn.policies import policy_names

    try:
        ints = {n: int(getattr(config, n)) for n in _INTS}
        rounds = int(config.refine_rounds)
        grid, budgets = [int(b) for b in config.grid], [int(b) for b in config.budgets]
    except (TypeError, ValueError) as err:
        raise ValueError(f"integer fields need integers: {err}") from None
    if min(ints.values()) < 1 or not grid or not budgets or min(grid + budgets) < 1:
        raise ValueError(f"{', '.join(_INTS)}, grid and budgets must be positive")
    if rounds < 0:
        raise ValueError(f"refine_rounds must be >= 0, got {rounds}")
    if ints["min_context_tokens"] > ints["context_tokens"]:
        raise ValueError(f"min_context_tokens {ints['min_context_tokens']} exceeds context_tokens")
    unknown = sorted(set(config.policies) - set(policy_names()))
    if not config.policies or unknown:
        raise ValueError(f"policies must be known policy names; unknown: {', '.join(unknown) or '(none given)'}")
    if not config.protocols or set(config.protocols) - set(TASK_PROTOCOLS):
        raise ValueError(f"protocols must be a non-empty list of {', '.join(TASK_PROTOCOLS)}, got {config.protocols}")
    if config.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {config.baseline!r}")
    for name in ("samples_file", "validation_file"):
        path = getattr(config, name)
        if (path or name == "samples_file") and not Path(path).is_file():
            raise FileNotFoundError(f"{name} {path!r}: no such file")
    if bool(config.artifact) != bool(config.router):
        raise ValueError("artifact (the folder to write) and router (the artifact it copies) go together")
    if config.artifact:
        dest = Path(config.artifact)
        if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / "polykv.json").is_file())):
            raise ValueError(f"artifact {config.artifact}: exists and is not an artifact folder (not replaced)")
    return CalibrateConfig(
        model=config.model, samples_file=config.samples_file, tasks=[str(t) for t in config.tasks],
        protocols=[str(p) for p in config.protocols], policies=[str(p) for p in config.policies], grid=grid,
        budgets=budgets, baseline=config.baseline, refine_rounds=rounds, validation_file=config.validation_file,
        router=config.router, artifact=config.artifact, out=config.out, **ints,
    )  # fmt: skip


def task_samples(
    path: str, split: str, tasks: Sequence[str], protocols: Sequence[str], tokenizer, limit: int, lengths: tuple
) -> list[tuple]:
    """(context ids (1, n), probe ids (1, m), description) of up to ``limit`` task rows of ``path``, round-robin over
    the task types (sorted), each row in the next of ``protocols`` of its type (rows without a question: query-
    agnostic), tokenised piece by piece as the evaluation does; ``lengths`` = (min, max context tokens, probe
    tokens). Every row of a used task type must be of ``split``."""
    import torch

    from polykv_learn.data.jsonl import load_samples
    from polykv_learn.learn.task_rows import QUERY_AGNOSTIC, task_pieces
    from polykv_learn.text import leading_special_ids

    rows = load_samples(path)
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        if not tasks or row.get("task") in tasks:
            if row.get("split", split) != split:
                raise ValueError(f"{path}: sample {row.get('id')!r} is of split {row.get('split')!r}, not {split!r}")
            by_task.setdefault(str(row.get("task")), []).append(row)
    missing = sorted(set(tasks) - set(by_task))
    if missing or not by_task:
        raise ValueError(f"{path}: no {split} samples of task types {', '.join(missing) or '(any)'}")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    lead = leading_special_ids(tokenizer)  # e.g. Gemma3's BOS, once before the context, as the evaluation prefills
    low, high, probe_tokens = lengths
    queues = {task: iter(enumerate(task_rows)) for task, task_rows in sorted(by_task.items())}
    out: list[tuple] = []
    while queues and len(out) < limit:
        for task in list(queues):
            for turn, row in queues[task]:
                protocol = protocols[turn % len(protocols)] if row.get("question") else QUERY_AGNOSTIC
                compressed, tail, answer = task_pieces(row, protocol)
                context = lead + [t for piece in compressed for t in ids(piece)]
                probe = ([t for piece in tail for t in ids(piece)] + ids(answer))[:probe_tokens]
                if low <= len(context) <= high and probe:
                    out.append((torch.tensor([context]), torch.tensor([probe]), f"{row.get('id')} ({protocol})"))
                    break
            else:
                del queues[task]
            if len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no sample with a compressed prefix of {low} to {high} tokens")
    return out


def _progress(message: str, since: float) -> None:
    print(f"calibrate: {message} ({time.perf_counter() - since:.0f} s)", file=sys.stderr, flush=True)


def _plan_dict(plan) -> dict:
    return {"policies": list(plan.policies), "budgets": list(plan.budgets)}


def run_calibrate(argv: Sequence[str]) -> dict:
    """The ``calibrate`` command: returns (and writes to ``out``) the JSON report; with ``artifact``, writes the copy
    of ``router`` with the calibrated plans."""
    config = read_config(argv)
    from polykv_learn.calibrate import (
        calibrated_plan,
        choose_policies,
        prefill_samples,
        refine_plan,
        sensitivity_curves,
        uniform_losses,
    )
    from polykv_learn.deploy.polykv import PolyKV
    from polykv_learn.models import load_model, load_tokenizer
    from polykv_learn.plan import Plan
    from polykv_learn.simulator import Simulator

    started = time.perf_counter()
    router = PolyKV.from_pretrained(config.router) if config.router else None  # a broken artifact fails here
    tokenizer = load_tokenizer(config.model)
    lengths = (config.min_context_tokens, config.context_tokens, config.probe_tokens)
    samples = task_samples(
        config.samples_file, "train", config.tasks, config.protocols, tokenizer, config.max_samples, lengths
    )
    validation = []
    if config.validation_file:
        validation = task_samples(
            config.validation_file, "validation", config.tasks, config.protocols, tokenizer,
            config.validation_samples, lengths,
        )  # fmt: skip
    n = min(context.shape[1] for context, _, _ in samples)
    for budget in config.budgets:
        if not min(config.b_min, n) <= budget < n:
            raise ValueError(f"budget {budget} is outside [min(b_min, n), n - 1] = [{min(config.b_min, n)}, {n - 1}]")
    model, _ = load_model(config.model, with_tokenizer=False)
    if router is not None:
        router.check_model(model)
    sim = Simulator(model)
    num_layers = sim.dims.num_layers
    timings: dict[str, float] = {"load_s": time.perf_counter() - started}
    at = time.perf_counter()
    calib = prefill_samples(sim, [(c, p) for c, p, _ in samples], config.policies)
    timings["prefill_s"] = time.perf_counter() - at
    _progress(f"{len(samples)} samples prefilled, n = {n}", started)
    at = time.perf_counter()
    full_curves = None
    if config.baseline in ("full", "both"):
        full_curves = sensitivity_curves(sim, calib, config.policies, config.grid)
    timings["sweep_full_s"] = time.perf_counter() - at
    _progress("full-baseline sweep done", started)
    per_budget: dict[str, dict] = {}
    plans: dict[int, Plan] = {}
    for budget in config.budgets:
        lower = min(config.b_min, budget)
        entry: dict[str, object] = {"uniform": uniform_losses(calib, config.policies, budget)}
        best = min(config.policies, key=lambda p: (entry["uniform"][p], config.policies.index(p)))
        starts = []
        if full_curves is not None:
            starts.append(("full", calibrated_plan(full_curves, budget, lower, n)))
        if config.baseline in ("uniform", "both"):
            at = time.perf_counter()
            base = Plan.uniform(best, budget, num_layers)
            curves = sensitivity_curves(sim, calib, config.policies, config.grid, base=base)
            timings[f"sweep_uniform_{budget}_s"] = time.perf_counter() - at
            _progress(f"B={budget}: uniform-baseline ({best}) sweep done", started)
            starts.append(("uniform", calibrated_plan(curves, budget, lower, n)))
            entry["uniform_baseline_curves"] = {"loss": curves.loss.tolist(), "full_loss": curves.full_loss.tolist()}
        losses = calib.mean_loss([plan for _, plan in starts])
        entry["allocated"] = {
            name: {**_plan_dict(plan), "loss": loss} for (name, plan), loss in zip(starts, losses, strict=True)
        }
        at = time.perf_counter()
        refined = refine_plan(
            calib, [plan for _, plan in starts] + [Plan.uniform(best, budget, num_layers)], budget,
            config.policies, b_min=lower, rounds=config.refine_rounds,
        )  # fmt: skip
        timings[f"refine_{budget}_s"] = time.perf_counter() - at
        _progress(f"B={budget}: refined, KL {refined.start_loss:.4f} -> {refined.loss:.4f}", started)
        entry["refined"] = {**_plan_dict(refined.plan), "loss": refined.loss, "start_loss": refined.start_loss,
                            "moves": list(refined.moves)}  # fmt: skip
        per_budget[str(budget)] = entry
        plans[budget] = refined.plan
    timings["calibration_s"] = time.perf_counter() - started
    report = {
        "config": asdict(config),
        "samples": [desc for _, _, desc in samples],
        "context_length": n,
        "loss": full_curves.loss.tolist() if full_curves is not None else None,
        "layer_policies": choose_policies(full_curves) if full_curves is not None else None,
        "budgets": per_budget,
        "plans": {str(b): _plan_dict(p) for b, p in plans.items()},
        "timings": timings,
    }
    if validation:
        report["validation"] = _validation(sim, validation, config, plans, router)
    if config.artifact:
        info = {k: v for k, v in asdict(config).items() if k not in ("out", "artifact", "validation_file")}
        info.update(samples=report["samples"], wall_time_s=timings["calibration_s"])
        if validation:
            info["validation"] = report["validation"]
        router.with_calibrated_plans(plans, n, config.b_min, info).save_pretrained(config.artifact)
    atomic_write_text(Path(config.out), json.dumps(report, indent=1) + "\n")
    return report


def _validation(sim, samples: list[tuple], config: CalibrateConfig, plans: dict, router) -> dict:
    """Mean KL on the validation samples of each calibrated plan, each uniform policy and (with a router) the router's
    static plan, per budget."""
    from polykv_learn.calibrate import prefill_samples
    from polykv_learn.plan import Plan

    extra = set(router.policies) if router is not None else set()
    calib = prefill_samples(sim, [(c, p) for c, p, _ in samples], [*config.policies, *sorted(extra)])
    num_layers = sim.dims.num_layers
    table: dict[str, dict[str, float]] = {}
    for budget, plan in plans.items():
        named = {"calibrated": plan, **{p: Plan.uniform(p, budget, num_layers) for p in config.policies}}
        if router is not None:
            named["router_static"] = router.router_static_plan(budget)
        table[str(budget)] = dict(zip(named, calib.mean_loss(list(named.values())), strict=True))
    return {"samples": [desc for _, _, desc in samples], "kl": table}
