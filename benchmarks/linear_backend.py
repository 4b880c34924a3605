"""oneDNN vs MKL for float32 matrix products on this CPU: SmolLM2's linear layers, the H2O statistics, and the
whole evaluation sweep per sample (``polykv_learn/onednn.py`` explains why the backends differ).

Each measurement is a median over repeats; the sweep runs each sample under both backends, interleaved sample by
sample (both see the same machine load), in one process with one model switched back and forth
(:func:`polykv_learn.adapter.use_onednn_linear`). The backends give the same products up to float32 rounding; the
sweep prints how many of its records still agree exactly (prediction and score) and the largest NLL difference.

    python benchmarks/linear_backend.py --threads 1                       # all three parts, SmolLM2
    python benchmarks/linear_backend.py --parts gemm h2o --threads 1      # the kernels only (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from polykv_learn import adapter, onednn  # noqa: E402
from polykv_learn.capture import accumulated_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_speed import TASKS  # noqa: E402  (the six scored task types, as in the evaluation script)

SHAPES = {
    "q/o proj": (576, 576),
    "k/v proj": (192, 576),
    "mlp up/gate": (1536, 576),
    "mlp down": (576, 1536),
    "lm head": (49152, 576),
}  # fmt: skip  (out, in) of SmolLM2-135M


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["gemm", "h2o", "sweep"], choices=["gemm", "h2o", "sweep"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 40, 760, 4025], help="token rows of a product")
    ap.add_argument("--context", type=int, default=4096, help="prefill length of the H2O part")
    ap.add_argument("--data", default="data/polykv/tasks/test.jsonl")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--per-task", type=int, default=1, help="samples per task type in the sweep")
    ap.add_argument("--router", default="checkpoints/smollm2-135m")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    return ap.parse_args(argv)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class mkl_only:  # noqa: N801 (used as a context manager)
    """Inside: every :func:`onednn.linear` takes F.linear (as without oneDNN)."""

    def __enter__(self) -> None:
        self._was = onednn.enabled()
        onednn.set_enabled(False)

    def __exit__(self, *exc: object) -> None:
        onednn.set_enabled(self._was)


def gemm(args: argparse.Namespace) -> None:
    print("linear layer      rows   MKL GFLOP/s   oneDNN GFLOP/s   ratio")
    gen = torch.Generator().manual_seed(0)
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, generator=gen)
        for rows in args.rows:
            x = torch.randn(rows, in_f, generator=gen)
            flop = 2 * rows * in_f * out_f
            mkl = median_seconds(lambda: F.linear(x, w), args.repeats)  # noqa: B023
            fast = median_seconds(lambda: onednn.linear(x, w), args.repeats)  # noqa: B023
            print(f"{name:<14} {rows:>7} {flop / mkl / 1e9:>13.0f} {flop / fast / 1e9:>16.0f} {mkl / fast:>7.2f}x")


def h2o(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(1)
    n = args.context
    q = torch.randn(1, 9, n, 64, generator=gen)  # (batch, H, n, d): one SmolLM2 layer
    k = torch.randn(1, 3, n, 64, generator=gen)  # (batch, G, n, d)
    valid = torch.ones(1, n, dtype=torch.bool)
    fast = median_seconds(lambda: accumulated_attention(q, k, valid, 0.125, 256), max(3, args.repeats // 2))
    with mkl_only():
        mkl = median_seconds(lambda: accumulated_attention(q, k, valid, 0.125, 256), max(3, args.repeats // 2))
        ref = accumulated_attention(q, k, valid, 0.125, 256)
    diff = (accumulated_attention(q, k, valid, 0.125, 256) - ref).abs().max().item()
    print(f"\nH2O statistics of one layer, n={n}: MKL {mkl * 1e3:.0f} ms, oneDNN {fast * 1e3:.0f} ms, "
          f"{mkl / fast:.2f}x (max abs difference {diff:.1e})")  # fmt: skip


def sweep(args: argparse.Namespace) -> None:
    from polykv_learn.capture import CaptureOptions
    from polykv_learn.data.jsonl import load_samples
    from polykv_learn.deploy.polykv import PolyKV
    from polykv_learn.eval.evaluator import EvalSettings, Evaluator
    from polykv_learn.eval.methods import available_methods, resolve_methods
    from polykv_learn.eval.results import select_samples
    from polykv_learn.models import load_model

    router = PolyKV.from_pretrained(args.router)
    methods = resolve_methods(None, available_methods(router))
    samples = select_samples(load_samples(args.data), args.tasks, args.per_task)
    model, tok = load_model(router.model_fingerprint["name"], onednn_linear=False)
    base = router.capture
    capture = CaptureOptions(base.window, base.future, True, base.chunk, reconstruct=True)
    evaluator = Evaluator(model, tok, methods, EvalSettings(), capture)

    def run(backend: str, sample: dict) -> tuple[float, list[dict]]:
        adapter.use_onednn_linear(model, enabled=backend == "oneDNN")
        if backend == "oneDNN":
            result = evaluator.evaluate_sample(sample)
        else:
            with mkl_only():
                result = evaluator.evaluate_sample(sample)
        return result.seconds, result.records

    print(f"\nsweep: {len(samples)} samples, {len(methods)} methods x 4 budgets, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    run("oneDNN", samples[0])  # warm-up
    seconds: dict[str, list[float]] = {"MKL": [], "oneDNN": []}
    same = total = 0
    nll_diff = 0.0
    for i, sample in enumerate(samples):
        order = ["MKL", "oneDNN"] if i % 2 == 0 else ["oneDNN", "MKL"]
        records = {}
        for backend in order:
            secs, records[backend] = run(backend, sample)
            seconds[backend].append(secs)
        for a, b in zip(records["MKL"], records["oneDNN"], strict=True):
            total += 1
            same += a["prediction"] == b["prediction"] and a["score"] == b["score"]
            nll_diff = max(nll_diff, abs(a["nll"] - b["nll"]))
        print(f"{sample['id']} (n={records['MKL'][0]['context_tokens']}): MKL {seconds['MKL'][-1]:.1f} s, "
              f"oneDNN {seconds['oneDNN'][-1]:.1f} s", flush=True)  # fmt: skip
    mkl, fast = statistics.median(seconds["MKL"]), statistics.median(seconds["oneDNN"])
    print(f"median s/sample: MKL {mkl:.1f}, oneDNN {fast:.1f}: {mkl / fast:.2f}x; "
          f"total {sum(seconds['MKL']):.0f} s vs {sum(seconds['oneDNN']):.0f} s: "
          f"{sum(seconds['MKL']) / sum(seconds['oneDNN']):.2f}x")  # fmt: skip
    print(f"records with the same prediction and score: {same}/{total}; largest NLL difference {nll_diff:.1e}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not onednn.available():
        raise SystemExit("this PyTorch has no usable oneDNN linear op; nothing to compare")
    for part in args.parts:
        {"gemm": gemm, "h2o": h2o, "sweep": sweep}[part](args)


if __name__ == "__main__":
    main()
