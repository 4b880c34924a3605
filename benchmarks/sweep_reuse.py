"""Layer reuse on a sensitivity sweep: the simulator's probe pass with and without sharing unchanged layers.

One capture of a real-text context (as in ``benchmarks/simulator_speed.py``), the calibration sweep's plans
(``calibrate.sweep_plans``: only layer l at policy p and budget b, every other layer full), layer-major, in passes
of ``--per-pass`` plans. Times every ``--stride``-th pass (so the passes spread over the depth) with
``reuse=True`` and ``reuse=False``, interleaved, ``--repeats`` times each; prints the medians' sum, their ratio
and the largest |logit difference| between the two (they must agree to fp32 round-off).

    python benchmarks/sweep_reuse.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulator_speed import add_setup_args, setup  # noqa: E402
from polykv_learn import adapter  # noqa: E402
from polykv_learn.calibrate import sweep_plans  # noqa: E402
from polykv_learn.simulator import Simulator  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(ap)
    ap.add_argument("--policies", nargs="+", default=["snapkv", "knorm"])
    ap.add_argument("--grid", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--per-pass", type=int, default=32)
    ap.add_argument("--stride", type=int, default=2, help="time every stride-th pass of the sweep")
    ap.add_argument("--repeats", type=int, default=1)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, context, probe = setup(args)
    sim = Simulator(model)
    capture = sim.capture(context)
    plans = sweep_plans(adapter.model_dims(model).num_layers, args.context, args.policies, args.grid)
    chunks = [plans[i : i + args.per_pass] for i in range(0, len(plans), args.per_pass)][:: args.stride]
    times: dict[bool, list[float]] = {True: [], False: []}
    worst = 0.0
    with torch.no_grad():
        sim.probe_logits(capture, probe, sim.hard_biases(capture, chunks[0][:2]))  # warm-up
        for chunk in chunks:
            biases = sim.hard_biases(capture, chunk)
            per: dict[bool, list[float]] = {True: [], False: []}
            out = {}
            for _ in range(args.repeats):
                for reuse in (True, False):
                    start = time.perf_counter()
                    out[reuse] = sim.probe_logits(capture, probe, biases, reuse=reuse)
                    per[reuse].append(time.perf_counter() - start)
            worst = max(worst, (out[True] - out[False]).abs().max().item())
            for reuse in (True, False):
                times[reuse].append(statistics.median(per[reuse]))
            print(f"  pass of {len(chunk)} plans: reuse {times[True][-1]:.2f}s, plain {times[False][-1]:.2f}s")
    with_reuse, plain = sum(times[True]), sum(times[False])
    print(
        f"{args.model}, n={args.context}, m={args.probe}, {len(plans)} sweep plans, {len(chunks)} passes of "
        f"{args.per_pass} timed: reuse {with_reuse:.2f}s, plain {plain:.2f}s, ratio {plain / with_reuse:.2f}x; "
        f"max |reuse - plain| logit difference {worst:.1e}"
    )


if __name__ == "__main__":
    main()
