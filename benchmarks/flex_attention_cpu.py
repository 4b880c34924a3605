"""The simulator's probe attention on CPU: torch's ``flex_attention`` (bias as ``score_mod``) vs the hand-written paths.

One layer's probe attention for ``P`` hard plans (SmolLM2 shapes by default: 9 query heads, 3 KV heads, d = 64,
context n = 2048, probe m = 32; plans keep 128/256/512 positions per KV head, one plan keeps everything): the
probe queries attend to the plan's kept context keys (0 / -inf bias) plus the probe keys causally. Rows:

- ``reference``: ``context_attention_reference`` (dense over n) + causal probe attention + lse merge;
- ``gathered``: the no-grad kept-keys path (``polykv_learn.kernels.gathered``) + the same probe attention and merge
  (what the simulator runs on CPU);
- ``flex eager`` / ``flex compiled``: ``flex_attention`` with ``score_mod = score + bias[b, h // R, kv]``. With
  ``return_lse`` (needed to merge the probe block) it runs over the context keys only; when compiled CPU flex refuses
  ``return_lse``, the row instead runs over [context keys, probe keys] per plan (the context K/V copied per plan,
  the probe part causal in the ``score_mod``), which needs no merge. A row that cannot run prints its error.

Timings: median of ``--repeats`` calls after a warm-up, in one process; the error column is the largest |out -
float64 reference| over the whole output.

    python benchmarks/flex_attention_cpu.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polykv_learn.kernels.gathered import gathered_context_attention  # noqa: E402
from polykv_learn.kernels.reference import (  # noqa: E402
    causal_attention_with_lse,
    context_attention_reference,
    merge_attention,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", type=int, default=16)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--probe", type=int, default=32)
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args(argv)


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p, h, g, d, n, m = args.plans, args.heads, args.kv_heads, args.head_dim, args.context, args.probe
    budgets = torch.tensor([args.budgets[i % len(args.budgets)] for i in range(p - 1)] + [n])  # last keeps all
    ranks = torch.argsort(torch.rand(p, g, n, generator=gen), dim=-1).argsort(dim=-1)
    return {
        "q": torch.randn(p, h, m, d, generator=gen),
        "k": torch.randn(g, n, d, generator=gen),
        "v": torch.randn(g, n, d, generator=gen),
        "pk": torch.randn(p, g, m, d, generator=gen),  # the probe's own keys/values, per plan
        "pv": torch.randn(p, g, m, d, generator=gen),
        "bias": torch.where(ranks < budgets[:, None, None], 0.0, float("-inf")),  # (P, G, n)
    }


def merged(context_fn, x: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    out_c, lse_c = context_fn(x["q"], x["k"], x["v"], x["bias"], scale)
    out_p, lse_p = causal_attention_with_lse(x["q"], x["pk"], x["pv"], scale)
    return merge_attention(out_c, lse_c, out_p, lse_p)


def flex_context(flex, x: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """flex over the context keys with the bias, returning lse; merged with the probe block."""
    p, h, _, d = x["q"].shape
    g, n, _ = x["k"].shape
    r, bias = h // g, x["bias"]

    def score_mod(score, b, head, q_idx, kv_idx):
        return score + bias[b, head // r, kv_idx]

    def context_fn(q, k, v, _bias, s):
        out, lse = flex(
            q,
            k[None].expand(p, g, n, d),
            v[None].expand(p, g, n, d),
            score_mod=score_mod,
            enable_gqa=True,
            scale=s,
            return_lse=True,
        )
        return out, lse.float()

    return merged(context_fn, x, scale)


def flex_concatenated(flex, x: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """flex over [context keys, probe keys] per plan, the bias on the context, causal on the probe; no lse."""
    p, h, m, d = x["q"].shape
    g, n, _ = x["k"].shape
    r = h // g
    bias = torch.cat([x["bias"], torch.zeros(p, g, m)], dim=-1)  # (P, G, n + m)
    keys = torch.cat([x["k"][None].expand(p, g, n, d), x["pk"]], dim=2)
    values = torch.cat([x["v"][None].expand(p, g, n, d), x["pv"]], dim=2)

    def score_mod(score, b, head, q_idx, kv_idx):
        future = (kv_idx >= n) & (kv_idx - n > q_idx)
        return torch.where(future, float("-inf"), score + bias[b, head // r, kv_idx])

    return flex(x["q"], keys, values, score_mod=score_mod, enable_gqa=True, scale=scale)


def time_it(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (compilation included)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.nn.attention.flex_attention import flex_attention

    x = make_inputs(args)
    scale = args.head_dim**-0.5
    x64 = {key: t.double() for key, t in x.items()}
    with torch.no_grad():
        truth = merged(context_attention_reference, x64, scale)
    compiled = torch.compile(flex_attention, dynamic=False)
    rows = {
        "reference (dense, torch)": lambda: merged(context_attention_reference, x, scale),
        "gathered (kept keys only)": lambda: merged(gathered_context_attention, x, scale),
        "flex eager, context + lse + merge": lambda: flex_context(flex_attention, x, scale),
        "flex compiled, context + lse + merge": lambda: flex_context(compiled, x, scale),
        "flex compiled, [context, probe] concatenated": lambda: flex_concatenated(compiled, x, scale),
    }
    print(
        f"P={args.plans}, H={args.heads}, G={args.kv_heads}, d={args.head_dim}, n={args.context}, m={args.probe}, "
        f"budgets {args.budgets} + one full plan, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print()
    print("| path | median ms per layer call | vs reference | max abs error vs float64 |")
    print("|---|---:|---:|---:|")
    base = None
    for name, fn in rows.items():
        try:
            with torch.no_grad():
                seconds, out = time_it(fn, args.repeats)
        except Exception as exc:  # noqa: BLE001 (report why a path cannot run on this machine)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"| {name} | cannot run: {type(exc).__name__}: {message[:200]} | | |", flush=True)
            traceback.print_exc(limit=0, file=sys.stderr)
            continue
        base = base or seconds
        error = (out.double() - truth).abs().max().item()
        print(f"| {name} | {seconds * 1e3:.1f} | {base / seconds:.2f}x | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
