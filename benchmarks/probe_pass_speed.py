"""The simulator's probe pass with the dense reference attention vs the gathered no-grad path, paired in one run.

One capture of the real-text context of ``benchmarks/simulator_speed.py`` (default SmolLM2, n = 2048, m = 32), the
first ``--plans`` plans of its plan mix without KVzip and H2O (whose statistics need the extra prefill passes);
then, interleaved ``--repeats`` times: the probe pass of all plans with the reference attention
(``kernels.gathered`` switched off), the same with the gathered path, and one naive real-cache run (prefill +
probe) of one of the plans in turn. Prints the medians, the per-plan cost of each probe pass against the median
naive run (the marginal cost of a plan, row (b) of ``simulator_speed.py`` without the prefill) and the largest
|logit difference| between the two paths. Paired like this, a loaded machine's noise hits both paths alike.

    python benchmarks/probe_pass_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulator_speed import add_setup_args, make_plans, naive_run, setup  # noqa: E402
from polykv_learn import adapter  # noqa: E402
from polykv_learn.kernels import gathered  # noqa: E402
from polykv_learn.simulator import Simulator  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(ap)
    ap.add_argument("--plans", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, context, probe = setup(args)
    num_layers = adapter.model_dims(model).num_layers
    pool = make_plans(num_layers, 4 * args.plans, [128, 256, 512])
    plans = [p for p in pool if not {"kvzip", "h2o"} & set(p.policies)][: args.plans]
    sim = Simulator(model)
    capture = sim.capture(context)
    biases = sim.hard_biases(capture, plans)
    real_applies = gathered.applies
    times: dict[str, list[float]] = {"reference": [], "gathered": [], "naive": []}
    out = {}
    with torch.no_grad():
        for r in range(args.repeats):
            for name, applies in (("reference", lambda *a: False), ("gathered", real_applies)):
                gathered.applies = applies
                start = time.perf_counter()
                out[name] = sim.probe_logits(capture, probe, biases, reuse=False)
                times[name].append(time.perf_counter() - start)
            gathered.applies = real_applies
            seconds, _ = naive_run(model, context, probe, plans[r % len(plans)])
            times["naive"].append(seconds)
            print(f"  repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = (out["reference"] - out["gathered"]).abs().max().item()
    print(f"{args.model}, n={args.context}, m={args.probe}, {len(plans)} plans, medians of {args.repeats}:")
    for name in ("reference", "gathered"):
        per_plan = med[name] / len(plans)
        print(
            f"  probe pass, {name} attention: {med[name]:.2f}s = {per_plan * 1e3:.0f} ms per plan; "
            f"naive run {med['naive'] * 1e3:.0f} ms; ratio {med['naive'] / per_plan:.1f}x"
        )
    print(f"  gathered / reference speed-up {med['reference'] / med['gathered']:.2f}x; max |logit diff| {diff:.1e}")


if __name__ == "__main__":
    main()
