"""Deployment cost and savings of a compressed cache inside ``model.generate``, against the full cache.

Default setting: SmolLM2-135M, a 4096-token prompt of real text (Python standard-library source), 64 greedy new
tokens, average budgets B in {128, 512}. Methods are a dict ``name -> cache factory(model, budget)``:
``full`` (a plain ``DynamicCache``, stock attention), ``snapkv`` (uniform SnapKV plan), ``adakv`` (AdaKV's
head-wise budgets over SnapKV scores, arXiv:2407.11550: each layer's ``G * B`` shared among its KV heads from the
layer's own statistics, ``layerwise.adakv_planner``, so every layer keeps its whole prefill until the last one has
run) and ``kvzip`` (uniform KVzip plan, arXiv:2505.23416: the prefill is followed by the teacher-forced
reconstruction pass over the full cache, so every layer keeps its whole prefill until that pass; ``kvzip-chunk``: the
same plan with KVzip's own chunk-local scores, ``CaptureOptions(reconstruct_scope="chunk")``,
:mod:`polykv_learn.reconstruct_chunked`); ``--router DIR``
adds the learned router (``polykv``, adaptive mode, so its prefill time includes capturing the router's signals) and
``polykv-heads`` (the same plan, each layer then split among its KV heads: by the router's learned head allocator
when it has one, ``make_cache(..., head_allocation="learned")``, else by AdaKV from its own routed policy's scores,
``head_allocation="adakv"``; like ``adakv``'s, a layer whose heads keep different numbers of
positions holds one tensor per KV head, :mod:`polykv_learn.ragged`).

Every (method, budget, repeat) runs in a fresh subprocess (repeats interleaved, method order rotated), which
loads the model, warms up on a short prompt, then runs one measured ``generate``. A streamer timestamps the
prompt (right before the prefill) and each new token, so, inside the real ``generate`` loop:

- prefill (+ compression) time = first new token - prompt;
- decode tokens/s = (new tokens - 1) / (last token - first token);
- KV bytes = bytes of key/value tensors held by the cache right after the prefill (at the first new token);
  padding = the share of them that no attention ever sees (``cache.padding_bytes``; at batch 1 none: a layer whose
  heads differ is held per head, not padded to its longest);
- peak RSS = the process's ``VmHWM`` during the measured ``generate``: the high-water mark is reset through
  ``/proc/self/clear_refs`` (``5``) after loading and warming up, because ``ru_maxrss`` (also reported) is a
  lifetime peak that model loading can dominate. Resident memory is what a user pays for, allocator caching
  included; tracemalloc would miss torch's native allocations.

Ratios are method / full over the medians of ``--repeats`` runs; targets: prefill <= 1.10 (<= 1.25 for the learned
router, whose adaptive mode also captures its layer signals in the prefill; <= 2.2 for ``kvzip``, whose scoring is a
second pass), decode >= 1.2 at B=128, KV bytes = B/n within 1% (head-wise ``adakv`` and ``polykv-heads``:
<= 1.1 B/n, their padding included; the "KV / (B/n)" column), peak RSS <= 1.05. The last column gives the same
prefill and decode ratios in process CPU time (``time.process_time``): on a shared machine, with ``--threads 1``,
it is the compute each method needs whatever the load (with several threads it also counts their spin-waiting).

    python benchmarks/deploy.py                                   # SmolLM2, n=4096, B in {128, 512}
    python benchmarks/deploy.py --model tiny-llama --context 512 --budgets 64 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulator_speed import real_text_ids  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from polykv_learn.cache import CompressedCache, cache_bytes, padding_bytes  # noqa: E402
from polykv_learn.capture import CaptureOptions  # noqa: E402
from polykv_learn.deploy import make_cache  # noqa: E402
from polykv_learn.layerwise import adakv_planner, kvzip_global_planner  # noqa: E402
from polykv_learn.models import load_model, load_tokenizer  # noqa: E402
from polykv_learn.plan import Plan  # noqa: E402

CacheFactory = Callable[[Any, int], Any]  # (model, average budget) -> a transformers Cache


def methods(router: str | None = None) -> dict[str, CacheFactory]:
    """name -> cache factory. ``full`` ignores the budget."""
    table: dict[str, CacheFactory] = {
        "full": lambda model, budget: DynamicCache(config=model.config),
        "snapkv": lambda model, budget: make_cache(
            model, Plan.uniform("snapkv", budget, model.config.num_hidden_layers)
        ),
        "adakv": lambda model, budget: make_cache(model, planner=adakv_planner("snapkv", budget)),
        # KVzip (arXiv:2505.23416): its reconstruction pass runs after the prefill, before any layer evicts
        "kvzip": lambda model, budget: make_cache(model, Plan.uniform("kvzip", budget, model.config.num_hidden_layers)),
        # the same plan scored by KVzip's / kvpress's own chunk-local definition (reconstruct_scope "chunk")
        "kvzip-chunk": lambda model, budget: CompressedCache(
            model,
            plan=Plan.uniform("kvzip", budget, model.config.num_hidden_layers),
            capture=CaptureOptions(reconstruct=True, reconstruct_scope="chunk"),
        ),
        # KVzip's own allocation: one top-k over every layer's and KV head's scores (eval's kvzip-global-heads)
        "kvzip-global-heads": lambda model, budget: make_cache(model, planner=kvzip_global_planner(budget)),
    }
    if router is not None:
        table["polykv"] = router_factory(router)
        table["polykv-heads"] = router_factory(router, head_allocation="heads")
    return table


def router_factory(directory: str, head_allocation: str = "none") -> CacheFactory:
    """The learned router's cache (adaptive mode: the plan is decided on each input at the end of the prefill);
    ``head_allocation="heads"``: each layer's budget then split among its KV heads, by the router's head allocator
    (``learned``) when it has one, else by AdaKV (``adakv``)."""
    from polykv_learn.deploy.polykv import PolyKV

    polykv = PolyKV.from_pretrained(directory)
    if head_allocation == "heads":
        head_allocation = "learned" if polykv.head_allocation == "learned" else "adakv"
    return lambda model, budget: polykv.make_cache(model, budget=budget, head_allocation=head_allocation)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--methods", nargs="+", default=None, help="compressed methods to run (default: all but full)")
    ap.add_argument(
        "--router", default=None, help="directory of a frozen learned router (adds methods 'polykv', 'polykv-heads')"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "BUDGET"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --- one measurement (in a fresh process) -----------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Clock:
    """A ``generate`` streamer: timestamps each put; the KV bytes right after the prefill (second put)."""

    def __init__(self, cache: Any):
        self.cache, self.times, self.cpu_times, self.kv_bytes, self.padding_bytes = cache, [], [], None, None

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        if len(self.times) == 2:
            self.kv_bytes, self.padding_bytes = cache_bytes(self.cache), padding_bytes(self.cache)

    def end(self) -> None:
        pass


def _generate(model, ids: torch.Tensor, cache: Any, new_tokens: int) -> _Clock:
    clock = _Clock(cache)
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        cache=cache,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
        pad_token_id=model.config.eos_token_id,
    )
    return clock


def worker(args: argparse.Namespace) -> dict[str, Any]:
    method, budget = args.worker[0], int(args.worker[1])
    if args.threads:
        torch.set_num_threads(args.threads)
    factory = methods(args.router)[method]
    model, _ = load_model(args.model, with_tokenizer=False)
    ids = real_text_ids(load_tokenizer(args.model), args.context)
    _generate(model, ids[:, :64], factory(model, min(budget, 32)), 4)  # warm-up (and switch attention)
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    clock = _generate(model, ids, factory(model, budget), args.new_tokens)
    t, c = clock.times, clock.cpu_times
    return {
        "method": method,
        "budget": budget,
        "prefill_s": t[1] - t[0],
        "decode_tok_s": (len(t) - 2) / (t[-1] - t[1]),
        "prefill_cpu_s": c[1] - c[0],
        "decode_cpu_s_per_tok": (c[-1] - c[1]) / (len(c) - 2),
        "new_tokens": len(t) - 1,
        "kv_bytes": clock.kv_bytes,
        "padding_bytes": clock.padding_bytes,
        "rss_before_kib": rss_before,
        "peak_rss_kib": _status_kib("VmHWM") if reset else None,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "threads": torch.get_num_threads(),
    }


# --- orchestration ----------------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, method: str, budget: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", method, str(budget), "--model", args.model]
    cmd += ["--context", str(args.context), "--new-tokens", str(args.new_tokens)]
    if args.router:
        cmd += ["--router", args.router]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} B={budget} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    compressed = args.methods or [m for m in methods(args.router) if m != "full"]
    jobs = [("full", 0)] + [(m, b) for b in args.budgets for m in compressed]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {job: [] for job in jobs}
    for r in range(args.repeats):
        order = jobs[r % len(jobs) :] + jobs[: r % len(jobs)]
        for method, budget in order:
            res = run_worker(args, method, budget)
            runs[(method, budget)].append(res)
            print(
                f"  repeat {r} {method:>8} B={budget:<4}: prefill {res['prefill_s']:.2f}s, "
                f"decode {res['decode_tok_s']:.1f} tok/s, KV {res['kv_bytes'] / 2**20:.1f} MiB, "
                f"peak RSS {(res['peak_rss_kib'] or 0) / 1024:.0f} MiB",
                flush=True,
            )

    def med(job: tuple[str, int], key: str) -> float:
        values = [run[key] for run in runs[job] if run[key] is not None]
        return statistics.median(values) if values else float("nan")

    full = ("full", 0)
    n = args.context
    threads = runs[full][0]["threads"]
    print()
    print(
        f"{args.model}, n={n}, {args.new_tokens} new tokens (greedy), medians of {args.repeats} fresh processes, "
        f"torch threads {threads}"
    )
    print()
    print(
        "| method | B | prefill+compress s | ratio (<= 1.10; polykv <= 1.25; kvzip(-chunk) <= 2.2) | "
        "decode tok/s | ratio (>= 1.2) | KV MiB | "
        "KV ratio | B/n | KV / (B/n) | padding | peak RSS MiB | ratio (<= 1.05) | peak - baseline MiB | "
        "CPU-time ratios: prefill, decode |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(job: tuple[str, int]) -> str:
        method, budget = job
        kv, kv_full = med(job, "kv_bytes"), med(full, "kv_bytes")
        peak, peak_full = med(job, "peak_rss_kib"), med(full, "peak_rss_kib")
        growth = peak - med(job, "rss_before_kib")
        cells = [
            method,
            str(budget) if budget else str(n),
            f"{med(job, 'prefill_s'):.2f}",
            f"{med(job, 'prefill_s') / med(full, 'prefill_s'):.3f}",
            f"{med(job, 'decode_tok_s'):.1f}",
            f"{med(job, 'decode_tok_s') / med(full, 'decode_tok_s'):.2f}",
            f"{kv / 2**20:.2f}",
            f"{kv / kv_full:.4f}",
            f"{min(budget or n, n) / n:.4f}",
            f"{kv / kv_full / (min(budget or n, n) / n):.3f}",
            f"{med(job, 'padding_bytes') / kv:.2%}",
            f"{peak / 1024:.0f}",
            f"{peak / peak_full:.3f}",
            f"{growth / 1024:.0f}",
            f"{med(job, 'prefill_cpu_s') / med(full, 'prefill_cpu_s'):.3f}, "
            f"{med(full, 'decode_cpu_s_per_tok') / med(job, 'decode_cpu_s_per_tok'):.2f}",
        ]
        return "| " + " | ".join(cells) + " |"

    for job in jobs:
        print(row(job))
    print()
    print(
        "lifetime ru_maxrss (MiB, model loading included): "
        + ", ".join(f"{m}@{b or n}: {med((m, b), 'maxrss_kib') / 1024:.0f}" for m, b in jobs)
    )


if __name__ == "__main__":
    main()
