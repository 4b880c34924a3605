"""Benchmark the fused Triton ``context_attention`` against torch SDPA.

On a GPU machine (realistic shapes: H=32, G=8, d=128, m=64, P=16, n in {8192, 32768}, bf16)::

    python benchmarks/triton_attention.py --device cuda

Rows of the Markdown table: (1) our kernel forward, (2) torch SDPA with a materialised additive float mask
of shape (P, H, m, n) (K/V repeated to H heads for GQA), (3) SDPA without a mask on the flash path (an
unmasked reference of what the hardware can do), (4) our backward (dq and dbias, with upstream gradients on
out and lse). Times are the median of ``--reps`` CUDA-event timings after ``--warmup`` runs. TFLOP/s counts
``4 P H m n d`` for a forward and ``10 P H m n d`` for our backward (5 matmuls: the dq kernel's 3 and the
d(bias) kernel's 2). GB/s counts the same compulsory bytes for every row (K, V, bias, q, out, lse; the
backward adds dout, dq, dbias) so rows compare; the ratios are time(ours) / time(other), below 1 means ours
is faster.

``--block-m/--block-n/--num-warps/--num-stages`` override our kernel's tiles for tuning.

Without CUDA (``--device cpu``, the default there) it runs a tiny smoke shape under the Triton interpreter
(``TRITON_INTERPRET=1``) and prints the same table: interpreter timing, meaningless as performance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="context lengths (cuda: 8192 32768)")
    ap.add_argument("--P", type=int, default=None, help="plans (cuda: 16)")
    ap.add_argument("--H", type=int, default=None, help="query heads (cuda: 32)")
    ap.add_argument("--G", type=int, default=None, help="KV heads (cuda: 8)")
    ap.add_argument("--m", type=int, default=None, help="probe queries (cuda: 64)")
    ap.add_argument("--d", type=int, default=None, help="head dim (cuda: 128)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None, help="cuda: bfloat16")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of keys kept by the random hard mask")
    ap.add_argument("--reps", type=int, default=None, help="timed runs (median); cuda: 20")
    ap.add_argument("--warmup", type=int, default=None, help="cuda: 5")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--block-m", type=int, default=None)
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    defaults = (
        {
            "n": [8192, 32768],
            "P": 16,
            "H": 32,
            "G": 8,
            "m": 64,
            "d": 128,
            "dtype": "bfloat16",
            "reps": 20,
            "warmup": 5,
        }
        if gpu
        else {"n": [100], "P": 2, "H": 4, "G": 2, "m": 8, "d": 16, "dtype": "float32", "reps": 3, "warmup": 1}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def timer(device: str, fn, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sdpa_try(candidates):
    """Run the first candidate ``(label, fn)`` that works; return ``(label, fn)`` or ``(error, None)``."""
    errors = []
    for label, fn in candidates:
        try:
            fn()
            return label, fn
        except (RuntimeError, TypeError, ValueError) as exc:  # backend refused this layout
            errors.append(f"{label}: {str(exc).splitlines()[0][:80]}")
    return "; ".join(errors), None


def bench_one(args, n: int, triton_context_attention) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dtype = args.device, getattr(torch, args.dtype)
    P, H, G, m, d = args.P, args.H, args.G, args.m, args.d
    R = H // G
    scaling = d**-0.5
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(P, H, m, d, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(G, n, d, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(G, n, d, device=dev, dtype=dtype, generator=gen)
    keep = torch.rand(P, G, n, device=dev, generator=gen) < args.keep
    keep[..., 0] = True  # no fully masked row (SDPA would give NaN there)
    bias = torch.zeros(P, G, n, device=dev).masked_fill(~keep, float("-inf"))

    esz = torch.finfo(dtype).bits // 8
    qo_bytes = 2 * P * H * m * d * esz + P * H * m * 4
    fwd_bytes = 2 * G * n * d * esz + P * G * n * 4 + qo_bytes
    fwd_flops = 4 * P * H * m * n * d
    rows = []

    def row(name, ms, flops, nbytes, note=""):
        rows.append({"name": name, "ms": ms, "tflops": flops / ms / 1e9, "gbs": nbytes / ms / 1e6, "note": note})

    with torch.no_grad():
        ours = timer(dev, lambda: triton_context_attention(q, k, v, bias, scaling), args.reps, args.warmup)
    row("ours fwd (triton)", ours, fwd_flops, fwd_bytes)

    # SDPA with a materialised (P, H, m, n) additive mask; K/V repeated to H heads (broadcast over plans).
    mask = bias.to(dtype).repeat_interleave(R, dim=1)[:, :, None, :].expand(P, H, m, n).contiguous()
    k_rep = k.repeat_interleave(R, dim=0)[None].expand(P, H, n, d)
    v_rep = v.repeat_interleave(R, dim=0)[None].expand(P, H, n, d)
    k_gqa = k[None].expand(P, G, n, d)
    v_gqa = v[None].expand(P, G, n, d)
    with torch.no_grad():
        label, fn = sdpa_try(
            [
                (
                    "K/V repeated, expand",
                    lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, mask, scale=scaling),
                ),
                (
                    "K/V repeated, contiguous",
                    lambda: F.scaled_dot_product_attention(
                        q, k_rep.contiguous(), v_rep.contiguous(), mask, scale=scaling
                    ),
                ),
            ]
        )
        if fn is None:
            rows.append({"name": "sdpa masked", "ms": float("nan"), "tflops": 0, "gbs": 0, "note": label})
        else:
            row(
                "sdpa masked",
                timer(dev, fn, args.reps, args.warmup),
                fwd_flops,
                fwd_bytes,
                f"mask (P,H,m,n); {label}",
            )

        def flash(kk, vv, gqa):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kk, vv, scale=scaling, enable_gqa=gqa)

        label, fn = sdpa_try(
            [
                ("enable_gqa", lambda: flash(k_gqa, v_gqa, True)),
                ("enable_gqa, contiguous", lambda: flash(k_gqa.contiguous(), v_gqa.contiguous(), True)),
                ("K/V repeated", lambda: flash(k_rep.contiguous(), v_rep.contiguous(), False)),
            ]
        )
        if fn is None:
            rows.append({"name": "sdpa flash, no mask", "ms": float("nan"), "tflops": 0, "gbs": 0, "note": label})
        else:
            row("sdpa flash, no mask", timer(dev, fn, args.reps, args.warmup), fwd_flops, fwd_bytes, label)

    if not args.no_backward:
        qg = q.clone().requires_grad_()
        bg = bias.clone().requires_grad_()
        out, lse = triton_context_attention(qg, k, v, bg, scaling)
        dout = torch.randn_like(out)
        dlse = torch.randn_like(lse)

        def backward():
            torch.autograd.grad((out, lse), (qg, bg), (dout, dlse), retain_graph=True)

        bwd_bytes = fwd_bytes + 2 * P * H * m * d * esz + P * H * m * 4 + P * G * n * 4
        row(
            "ours bwd (dq, dbias)",
            timer(dev, backward, args.reps, args.warmup),
            10 * P * H * m * n * d,
            bwd_bytes,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from polykv_learn.kernels import triton_attention
    from polykv_learn.kernels.triton_attention import triton_context_attention

    overrides = {
        key: value
        for key, value in {
            "BLOCK_M": args.block_m,
            "BLOCK_N": args.block_n,
            "num_warps": args.num_warps,
            "num_stages": args.num_stages,
        }.items()
        if value is not None
    }
    if overrides:
        base = triton_attention._config
        triton_attention._config = lambda rows, n, d, interpret: {**base(rows, n, d, interpret), **overrides}

    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, Triton interpreter"
    print(f"# context_attention benchmark: {where}")
    if args.device == "cpu":
        print("\n**Interpreter timing on CPU: meaningless as performance; a smoke run of the script.**")
    print(
        f"\nP={args.P} H={args.H} G={args.G} m={args.m} d={args.d} dtype={args.dtype} keep={args.keep} "
        f"median of {args.reps} (warmup {args.warmup})" + (f"; tile overrides {overrides}" if overrides else "")
    )
    for n in args.n:
        rows = bench_one(args, n, triton_context_attention)
        by_name = {r["name"]: r["ms"] for r in rows}
        ours = by_name["ours fwd (triton)"]
        print(f"\n## n = {n}\n")
        print("| op | ms | TFLOP/s | GB/s | note |")
        print("|---|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['name']} | {r['ms']:.3f} | {r['tflops']:.3g} | {r['gbs']:.4g} | {r['note']} |")
        for other in ("sdpa masked", "sdpa flash, no mask"):
            ratio = ours / by_name[other] if by_name.get(other) == by_name.get(other) else float("nan")
            print(f"\ntime(ours fwd) / time({other}) = {ratio:.2f}", end="")
        print()


if __name__ == "__main__":
    main()
