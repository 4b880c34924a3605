"""Memory of head-wise budgets in the deployed cache: the padding each layer's KV heads take up.

A layer of a :class:`~polykv_learn.cache.CompressedCache` whose KV heads keep different numbers of positions holds
one tensor per head (:mod:`polykv_learn.ragged`), so a head-wise plan (AdaKV, arXiv:2407.11550) at batch 1 allocates
exactly its ``L * G * B`` kept positions (before, every head was padded to the layer's longest;
``CompressedLayer.ragged_heads = False`` still does that). For one prompt of real text (Python standard-library
source) and each budget, this prints the bytes a uniform SnapKV plan and the ``adakv`` / ``adakv-global`` plans of
the evaluation hold right after the prefill, the padding among them and the overhead (padding / kept).

    python benchmarks/headwise_padding.py                     # SmolLM2, n=2048, B=128
    python benchmarks/headwise_padding.py --model tiny-llama --context 256 --budgets 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulator_speed import real_text_ids  # noqa: E402

from polykv_learn import adapter  # noqa: E402
from polykv_learn.cache import CompressedCache, cache_bytes, padding_bytes  # noqa: E402
from polykv_learn.capture import CaptureOptions  # noqa: E402
from polykv_learn.models import load_model, load_tokenizer  # noqa: E402
from polykv_learn.plan import Plan  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--budgets", type=int, nargs="+", default=[128])
    ap.add_argument("--alpha", type=float, default=0.2, help="AdaKV's per-head floor, a share of the layer budget")
    args = ap.parse_args(argv)
    model, _ = load_model(args.model, with_tokenizer=False)
    ids = real_text_ids(load_tokenizer(args.model), args.context)
    shared = CompressedCache(model, capture=CaptureOptions())
    with torch.no_grad():
        adapter.forward(model, ids, shared, logits_to_keep=1)
    stats = shared.layer_stats
    g = adapter.model_dims(model).num_kv_heads
    print(f"{args.model}, n={args.context}, alpha={args.alpha}")
    print("| method | B | KV MiB | kept MiB | padding MiB | padding / kept | heads with more than B (share) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for budget in args.budgets:
        plans = {
            "snapkv": Plan.uniform("snapkv", budget, len(stats)),
            "adakv": Plan.adakv("snapkv", budget, stats, alpha=args.alpha),
            "adakv-global": Plan.adakv_global("snapkv", budget, stats, alpha=args.alpha),
        }
        for name, plan in plans.items():
            cache = CompressedCache(model, plan=plan)
            with torch.no_grad():
                adapter.forward(model, ids, cache, logits_to_keep=1)
            total, pad = cache_bytes(cache), padding_bytes(cache)
            heads = [b for layer in range(plan.num_layers) for b in plan.layer_head_budgets(layer, g)]
            above = sum(b > budget for b in heads) / len(heads)
            mib = 2**20
            print(
                f"| {name} | {budget} | {total / mib:.2f} | {(total - pad) / mib:.2f} | {pad / mib:.2f} | "
                f"{pad / (total - pad):.1%} | {above:.0%} |"
            )


if __name__ == "__main__":
    main()
