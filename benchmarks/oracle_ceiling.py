"""The search ceiling next to the deployable methods on a few needle samples (SmolLM2, plain prompt).

For each sample and budget, ``oracle`` searches a plan through the simulator with the sample's own gold answer as
the probe (``polykv_learn/search.py``); it is an upper bound of what plans of the policy pool can do, never a
deployable method. Prints each method's prediction, score, gold-answer NLL and KL to the full cache, and the
search's start (best uniform policy) and final NLL.

    OMP_NUM_THREADS=1 python benchmarks/oracle_ceiling.py --budgets 256 --rounds 3 --samples 2
    OMP_NUM_THREADS=1 python benchmarks/oracle_ceiling.py --data data/polykv/tasks/heldout.jsonl --query-aware

Without ``--data`` the samples are generated test records of the filler haystack (no download needed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polykv_learn.capture import CaptureOptions  # noqa: E402
from polykv_learn.data.jsonl import load_samples  # noqa: E402
from polykv_learn.data.tasks import build_tasks  # noqa: E402
from polykv_learn.deploy.polykv import PolyKV  # noqa: E402
from polykv_learn.eval.evaluator import EvalSettings, Evaluator  # noqa: E402
from polykv_learn.eval.methods import available_methods, resolve_methods  # noqa: E402
from polykv_learn.eval.runner import run_evaluation  # noqa: E402
from polykv_learn.models import load_model  # noqa: E402

METHODS = ["full", "streaming", "snapkv", "h2o", "knorm", "polykv", "oracle"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", default="checkpoints/smollm2-135m")
    ap.add_argument("--budgets", type=int, nargs="+", default=[256])
    ap.add_argument("--rounds", type=int, default=3, help="most search rounds per sample and budget")
    ap.add_argument("--samples", type=int, default=2, help="samples, taken in turn from each of --tasks")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "multi_key_needle"])
    ap.add_argument("--data", default=None, help="a task JSONL file (default: generated filler-haystack records)")
    ap.add_argument("--query-aware", action="store_true", help="compress the question with the context")
    args = ap.parse_args(argv)
    tasks = args.tasks
    if args.data:
        rows = load_samples(args.data)
    else:
        rows = build_tasks({}, target_tokens=(1024, 2048), samples_per_task=2 * max(2, args.samples), tasks=tasks)
        rows = [r for r in rows if r["split"] == "test"]
    by_task = {t: [r for r in rows if r["task"] == t] for t in tasks}
    missing = [t for t in tasks if not by_task[t]]
    if missing:
        raise SystemExit(f"no samples of {missing} in {args.data or 'the generated records'}")
    samples = [by_task[tasks[i % len(tasks)]][i // len(tasks)] for i in range(args.samples)]
    router = PolyKV.from_pretrained(args.router)
    c = router.capture
    methods = resolve_methods(METHODS, available_methods(router, oracle_rounds=args.rounds))
    model, tok = load_model(router.model_fingerprint["name"])
    settings = EvalSettings(budgets=tuple(args.budgets), chat=False, query_aware=args.query_aware)
    capture = CaptureOptions(c.window, c.future, True, c.chunk, reconstruct=True)  # the oracle's pool: H2O, KVzip
    evaluator = Evaluator(model, tok, methods, settings, capture)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        res = run_evaluation(evaluator, samples, out, progress=False)
    protocol = "query-aware" if args.query_aware else "query-agnostic"
    elapsed = time.perf_counter() - start
    print(f"{len(samples)} samples, {protocol}, budgets {args.budgets}, {args.rounds} rounds: {elapsed:.0f} s")
    print("| sample | method | B | prediction | score | answer NLL | answer KL | search start -> final NLL |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    for r in res["samples"]:
        search = ""
        if "search_nll" in r:
            search = f"{r['search_start_policy']} {r['search_start_nll']:.3f} -> {r['search_nll']:.3f}"
        print(
            f"| {r['id']} | {r['method']} | {r['budget'] or ''} | {r['prediction'][:24]!r} | {r['score']:.2f} "
            f"| {r['nll']:.3f} | {r['kl']:.3f} | {search} |"
        )


if __name__ == "__main__":
    main()
