"""``polykv-learn`` command line.

polykv-learn prepare-data --out data/polykv             # offline corpus + evaluation tasks
polykv-learn fit --config configs/smollm2-135m.yaml     # Lightning CLI: every field overridable
polykv-learn generate --router checkpoints/smollm2-135m --budget 128 --prompt-file prompt.txt
polykv-learn evaluate --router checkpoints/smollm2-135m --out results/   # see `evaluate --help`
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _fit(argv: Sequence[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    from polykv_learn.learn.datamodule import PrefillDataModule
    from polykv_learn.learn.module import PolyKVLearner

    class PolyKVCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # one base model and one policy set for both the prefills and the learner
            parser.link_arguments("model.model_name", "data.model_name")
            parser.link_arguments("model.policies", "data.policies")
            parser.link_arguments("model.overlap_policies", "data.overlap_policies")

    PolyKVCLI(
        PolyKVLearner,
        PrefillDataModule,
        args=list(argv),  # parsed here, not from sys.argv
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "polykv-learn"},
    )


def _prepare_data(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="polykv-learn prepare-data", description="Build the offline corpus and tasks.")
    p.add_argument("--out", default="data/polykv", help="output folder (corpus/, tasks/, manifest.json)")
    p.add_argument("--model", default="smollm2-135m", help="model whose tokenizer measures lengths")
    p.add_argument("--sources", default="bigbench,austen,python", help="comma-separated: bigbench, austen, python")
    p.add_argument("--max-docs-per-source", type=int, default=None)
    p.add_argument("--samples-per-task", type=int, default=50)
    p.add_argument("--synthetic-docs", type=int, default=300)
    p.add_argument("--min-context", type=int, default=512)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to task prompts")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from polykv_learn.data.prepare import ALL_SOURCES, prepare_data
    from polykv_learn.learn.shared import shared_tokenizer

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in ALL_SOURCES]
    if unknown:
        p.error(f"unknown sources {unknown}; allowed: {', '.join(ALL_SOURCES)}")
    tok = shared_tokenizer(args.model)

    def length_fn(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    manifest = prepare_data(
        args.out,
        length_fn,
        seed=args.seed,
        max_docs_per_source=args.max_docs_per_source,
        sources=sources,
        context_tokens=(args.min_context, args.max_context),
        target_tokens=(min(max(args.min_context, 1024), args.max_context), args.max_context),
        samples_per_task=args.samples_per_task,
        synthetic_docs=args.synthetic_docs,
        chat=args.chat,
    )
    import json

    print(json.dumps(manifest, indent=2))


def _generate(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="polykv-learn generate", description="Generate with a compressed KV cache.")
    p.add_argument("--router", required=True, help="artifact folder (e.g. checkpoints/smollm2-135m)")
    p.add_argument("--budget", type=int, required=True, help="average kept positions per layer and KV head")
    p.add_argument("--prompt-file", required=True, help="text file with the prompt (the context + question)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--mode", choices=("adaptive", "static"), default="adaptive")
    p.add_argument("--model", default=None, help="model to load (default: the one the router was trained for)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the tokenizer's chat template (default: when the tokenizer has one)",
    )
    args = p.parse_args(argv)
    import torch

    from polykv_learn import adapter
    from polykv_learn.cache import cache_bytes
    from polykv_learn.deploy.polykv import PolyKV
    from polykv_learn.models import load_model

    polykv = PolyKV.from_pretrained(args.router)
    model, tok = load_model(args.model or polykv.model_fingerprint["name"])
    text = Path(args.prompt_file).read_text()
    if args.chat or (args.chat is None and tok.chat_template):
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    cache = polykv.make_cache(model, budget=args.budget, mode=args.mode)
    with torch.no_grad():
        out = model.generate(
            ids, **{adapter.cache_kwarg(model): cache}, max_new_tokens=args.max_new_tokens, do_sample=False
        )
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    plan = cache.applied_plan
    dims = polykv.model_fingerprint
    n_total = out.shape[1] - 1  # the last token is never written to the cache
    full = dims["num_layers"] * n_total * dims["num_kv_heads"] * dims["head_dim"] * 2 * model.dtype.itemsize
    held = cache_bytes(cache)
    print(answer)
    print(f"\n--- plan ({args.mode}, budget {args.budget}, context {ids.shape[1]} tokens) ---")
    print(plan if plan is not None else "(no eviction)")
    print(f"\nKV bytes: {held:,} vs full {full:,} ({held / full:.1%})")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from polykv_learn.eval.cli import evaluate_main

    commands = {
        "fit": None,
        "validate": None,
        "prepare-data": _prepare_data,
        "generate": _generate,
        "evaluate": evaluate_main,
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        print(f"commands: {', '.join(commands)}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command in ("fit", "validate"):
        _fit([command, *rest])
    else:
        commands[command](rest)


if __name__ == "__main__":
    main()
