"""A hand-made plan shaped like the search ceiling's: one retrieval layer keeps (nearly) its whole context, every
other layer a few sinks and recent tokens (StreamingLLM), the exact total ``L * B``. A diagnostic of the oracle's
finding on held-out needles (docs/results.md, "Search ceiling"), not a method: the layer is given, not learned.

    OMP_NUM_THREADS=1 python benchmarks/retrieval_layer_plan.py --layers 17 18 20 --budgets 128 256 --limit 12

Prints the mean score per method and budget over the samples (``full``, ``streaming`` and each ``layer-K`` plan).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polykv_learn.capture import CaptureOptions  # noqa: E402
from polykv_learn.data.jsonl import load_samples  # noqa: E402
from polykv_learn.eval.evaluator import EvalSettings, Evaluator  # noqa: E402
from polykv_learn.eval.methods import Method, MethodInput, available_methods, resolve_methods  # noqa: E402
from polykv_learn.eval.runner import run_evaluation  # noqa: E402
from polykv_learn.models import load_model  # noqa: E402
from polykv_learn.plan import Plan  # noqa: E402


def retrieval_layer_plan(layer: int, budget: int, num_layers: int, n: int, big_policy: str = "snapkv") -> Plan:
    """Layer ``layer`` keeps ``min(n, L * B - (L - 1) * m)`` positions (``m = min(16, B)``), the other layers share
    the rest evenly (largest remainder), each within ``[1, n]``: the budgets sum to exactly ``L * B``."""
    total = num_layers * budget
    m = min(16, budget)
    big = min(n, total - (num_layers - 1) * m)
    rest, k = total - big, num_layers - 1
    small = [rest // k + (1 if i < rest % k else 0) for i in range(k)]
    if max(small) > n:
        raise ValueError(f"budget {budget} over {num_layers} layers does not fit a {n}-token context")
    budgets = small[:layer] + [big] + small[layer:]
    policies = ["streaming"] * num_layers
    policies[layer] = big_policy  # used only where the layer cannot keep its whole context
    assert sum(budgets) == total
    return Plan.from_lists(policies, budgets)


def method(layer: int, big_policy: str) -> Method:
    def plan(sample: MethodInput, budget: int) -> Plan:
        return retrieval_layer_plan(layer, budget, sample.num_layers, sample.context_length, big_policy=big_policy)

    return Method(f"layer-{layer}", "allocation", f"layer {layer} keeps its context, the rest streaming", plan)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/polykv/tasks/heldout.jsonl")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "multi_key_needle"])
    ap.add_argument("--layers", type=int, nargs="+", default=[18])
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--big-policy", default="snapkv", help="the retrieval layer's policy where n exceeds its budget")
    ap.add_argument("--limit", type=int, default=12, help="samples per task (the first ones of the file)")
    ap.add_argument("--query-aware", action="store_true", help="compress the question with the context")
    args = ap.parse_args(argv)
    rows = load_samples(args.data)
    samples = [r for t in args.tasks for r in [r for r in rows if r["task"] == t][: args.limit]]
    methods = resolve_methods(["full", "streaming"], available_methods())
    methods += [method(k, args.big_policy) for k in args.layers]
    model, tok = load_model()
    settings = EvalSettings(budgets=tuple(args.budgets), chat=False, query_aware=args.query_aware)
    evaluator = Evaluator(model, tok, methods, settings, CaptureOptions())
    with tempfile.TemporaryDirectory() as out:
        res = run_evaluation(evaluator, samples, out, progress=False)
    scores: dict[tuple[str, int | None], list[float]] = {}
    for r in res["samples"]:
        scores.setdefault((r["method"], r["budget"]), []).append(r["score"])
    protocol = "query-aware" if args.query_aware else "query-agnostic"
    print(f"{len(samples)} samples ({', '.join(args.tasks)}), {protocol}")
    for (name, budget), values in scores.items():
        print(f"{name:12s} B={budget}: {sum(values) / len(values):.3f} ({len(values)} samples)")


if __name__ == "__main__":
    main()
