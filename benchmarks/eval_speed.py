"""Seconds per sample of the evaluation sweep (every method and budget on one sample), by batching setting.

Each sample runs once per setting, settings interleaved sample by sample (so both see the same machine load), in
one process with the same model. Settings (``EvalSettings.batch_size`` / ``group_size``):

- ``one-at-a-time``: every fork decoded alone (batch 1, no padding);
- ``8-per-batch``: 8 forks per batch, padded together (the runner's layout before the fork batch: one group per
  batch);
- ``all-in-one`` (the default): every fork of the sample in one batch, attention in groups of 8.

Every setting must give the same scores and predictions (checked; NLL/KL to 1e-4): batching is only a speed-up.
Prints the median seconds per sample of each setting and its ratio to ``8-per-batch``.

    python benchmarks/eval_speed.py --router checkpoints/smollm2-135m --per-task 1 --threads 1
    python benchmarks/eval_speed.py --model tiny-llama --data my.jsonl --tasks passkey --no-router   # smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from polykv_learn.capture import CaptureOptions  # noqa: E402
from polykv_learn.data.jsonl import load_samples  # noqa: E402
from polykv_learn.deploy.polykv import PolyKV  # noqa: E402
from polykv_learn.eval.evaluator import EvalSettings, Evaluator  # noqa: E402
from polykv_learn.eval.methods import available_methods, resolve_methods  # noqa: E402
from polykv_learn.eval.results import select_samples  # noqa: E402
from polykv_learn.models import load_model  # noqa: E402

SETTINGS = {"one-at-a-time": (1, 1), "8-per-batch": (8, 8), "all-in-one": (64, 8)}
TASKS = ["summarisation", "code_completion", "multi_key_needle", "multi_query_needle", "few_shot_classification",
         "passkey"]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/polykv/tasks/test.jsonl")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--per-task", type=int, default=1, help="samples per task type")
    ap.add_argument("--router", default="checkpoints/smollm2-135m")
    ap.add_argument("--no-router", action="store_true", help="baselines only")
    ap.add_argument("--model", default=None, help="default: the router's model")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    return ap.parse_args(argv)


def same_results(a: list[dict], b: list[dict]) -> bool:
    for x, y in zip(a, b, strict=True):
        keys = ("method", "budget", "prediction", "score")
        if [x[k] for k in keys] != [y[k] for k in keys]:
            return False
        if not all(math.isclose(x[k], y[k], rel_tol=1e-4, abs_tol=1e-5) for k in ("nll", "kl")):
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    router = None if args.no_router else PolyKV.from_pretrained(args.router)
    methods = resolve_methods(None, available_methods(router))
    samples = select_samples(load_samples(args.data), args.tasks, args.per_task)
    model, tok = load_model(args.model or (router.model_fingerprint["name"] if router else "smollm2-135m"))
    base = router.capture if router else CaptureOptions()
    capture = CaptureOptions(base.window, base.future, True, base.chunk, reconstruct=True)
    evaluators = {
        name: Evaluator(model, tok, methods, EvalSettings(batch_size=b, group_size=g), capture)
        for name, (b, g) in SETTINGS.items()
        if name in args.settings
    }
    print(f"{len(samples)} samples, {len(methods)} methods x 4 budgets, torch threads {torch.get_num_threads()}")
    evaluators[args.settings[0]].evaluate_sample(samples[0])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in evaluators}
    for i, sample in enumerate(samples):
        order = list(evaluators)[i % len(evaluators) :] + list(evaluators)[: i % len(evaluators)]  # rotate
        records = {}
        for name in order:
            result = evaluators[name].evaluate_sample(sample)
            seconds[name].append(result.seconds)
            records[name] = result.records
        first = records[order[0]]
        if not all(same_results(first, r) for r in records.values()):
            raise SystemExit(f"sample {sample['id']}: the settings disagree; batching must not change a result")
        cells = "  ".join(f"{name} {seconds[name][-1]:.1f} s" for name in evaluators)
        print(f"{sample['id']} (n={result.context_tokens}): {cells}", flush=True)
    ref = statistics.median(seconds["8-per-batch"]) if "8-per-batch" in seconds else None
    print("\nsetting          median s/sample   speed vs 8-per-batch")
    for name, values in seconds.items():
        median = statistics.median(values)
        ratio = f"{ref / median:.2f}x" if ref else "-"
        print(f"{name:<16} {median:>15.1f}   {ratio}")
    print("every setting gave the same predictions and scores (NLL/KL to 1e-4)")


if __name__ == "__main__":
    main()
