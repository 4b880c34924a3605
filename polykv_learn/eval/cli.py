"""``polykv-learn evaluate``: every method and budget on an offline LongBench-style suite (or your JSONL).

polykv-learn evaluate --out out/eval                               # test split, all methods, B = 128..1024
polykv-learn evaluate --out out/eval-aware --query-aware           # the question is compressed too
polykv-learn evaluate --data my.jsonl --methods full snapkv polykv --budgets 256 --limit 5 --out out/mine
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_DATA = Path("data/polykv/tasks/test.jsonl")
DEFAULT_ROUTER = Path("checkpoints/smollm2-135m")

EPILOG = """\
methods (--methods; default: every available one except the `random` control):
  full                 no eviction (always run: the reference of KL and gap recovery)
  snapkv streaming h2o tova knorm expected_attention
                       one policy at every layer with the uniform budget B (`random` as a control)
  pyramid              PyramidKV linear layer schedule, SnapKV scores
  cake                 CAKE entropy x variance layer allocation, SnapKV scores
  polykv               the learned router/allocator of --router, adaptive (plan from this prefill)
  polykv-static        the same artifact's static plan (one plan per budget)
  polykv-gbdt          the GBDT router of --gbdt-router, adaptive

protocols: query-agnostic (default) compresses the context alone, then asks the question;
--query-aware compresses context + question, then feeds only the answer prefix.

outputs in --out: results.json (summary: method -> budget -> task -> mean score and "average";
full_cache; gap_recovery and gap_recovery_test_only per method and budget; summary_nll, summary_kl;
example_plans; samples: one record per sample/method/budget with id, task, method, budget, prediction,
score, nll, kl, context_tokens, kept, kv_bytes), results.md, score_vs_budget.png, plan_map.png; and
samples.jsonl, written as the run goes (its settings, then one line per finished sample): a stopped run
continues with --resume, which skips the samples it holds and rebuilds every output from all of them.

checked before the model loads: --out (a folder that can be written), every --data line, budgets, methods,
the router artifacts, and the length of every sample: one that needs more positions than the model has
(max_position_embeddings) stops the run unless --max-context cuts it.

JSONL schema (--data): one object per line with context, question, answers (list of strings), metric
(string_match, qa_f1, rouge_l, classification, code_sim); optional task, id, answer_prefix, max_new_tokens,
all_classes.
"""


def _names(values: Sequence[str] | None) -> list[str] | None:
    """Accept both ``--methods a b`` and ``--methods a,b``."""
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError(f"--shard must be I/K (e.g. 0/2), got {text!r}")
    return int(index), int(count)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polykv-learn evaluate",
        description="Evaluate KV-cache eviction methods (single policies, PyramidKV, CAKE, the learned PolyKV "
        "router) at fixed average budgets with real compressed caches and greedy decoding. One full prefill per "
        "sample is shared by every method and budget.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help=f"JSONL samples (default: {DEFAULT_DATA}, made by `polykv-learn prepare-data`)",
    )
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, plots)")
    p.add_argument(
        "--router",
        default=None,
        help=f"trained artifact folder for polykv/polykv-static (default: {DEFAULT_ROUTER} if present)",
    )
    p.add_argument("--no-router", action="store_true", help="ignore the default router (baselines only)")
    p.add_argument("--gbdt-router", default=None, help="artifact folder of a GBDT router (enables polykv-gbdt)")
    p.add_argument(
        "--model",
        default=None,
        help="model name or local HF folder (default: the router's model, else smollm2-135m)",
    )
    p.add_argument("--methods", nargs="+", default=None, help="methods to run (space or comma separated)")
    p.add_argument(
        "--budgets",
        nargs="+",
        type=int,
        default=None,
        help="average budgets B: kept positions per KV head and layer, all kept positions counted "
        "(default: 128 256 512 1024)",
    )
    p.add_argument("--tasks", nargs="+", default=None, help="only these task names (space or comma separated)")
    p.add_argument("--limit", type=int, default=None, help="at most N samples per task (quick runs)")
    p.add_argument(
        "--shard",
        default="0/1",
        help="I/K: only every K-th selected sample of each task, from the I-th (K parallel runs, joined by --merge)",
    )
    p.add_argument(
        "--query-aware",
        action="store_true",
        help="compress context + question (SnapKV-paper/KVCache-Factory style) instead of the context alone",
    )
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        help="wrap context + question in the tokenizer's chat template (user turn; the answer prefix starts the "
        "assistant turn). The default whenever the tokenizer has a chat template (SmolLM2-Instruct does: without it "
        "the model often ends its answer at once)",
    )
    chat.add_argument(
        "--no-chat",
        dest="chat",
        action="store_false",
        help="plain text prompt `context\\n\\nquestion\\nanswer_prefix` (the default for tokenizers without a chat "
        "template)",
    )
    p.set_defaults(chat=None)
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="cut contexts longer than this many tokens in the middle (first and last halves kept). Without it a "
        "sample longer than the model's positions stops the run before the model loads",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="compressed caches decoded together as one batch (default 64: every method and budget of a sample; "
        "their linear layers run as one matrix product)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=8,
        help="caches of similar size whose keys are padded together for attention (default 8; memory grows with "
        "this times the longest cache in a group)",
    )
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="base attention implementation")
    p.add_argument(
        "--no-onednn",
        action="store_true",
        help="float32 products through torch's default BLAS (MKL) instead of oneDNN (polykv_learn/onednn.py; the "
        "same results up to rounding, 1.4x slower per sample on the project's AMD CPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own choice). On a shared or busy machine use 1: oversubscribed "
        "OpenMP threads can make every matmul many times slower",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the stopped run in --out from its samples.jsonl (the same options; refused if they differ): "
        "finished samples are skipped, every output is rebuilt from all samples. Without it, an --out that holds "
        "an earlier run's samples.jsonl is refused",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="no evaluation: merge the results.json of these --out folders (runs of one configuration on disjoint "
        "samples, e.g. one process per task) into --out, recomputing every summary",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="with --merge BASE UPDATE: take UPDATE's methods (e.g. --methods polykv polykv-static with a retrained "
        "--router) from UPDATE and every other method from BASE; same samples, full-cache results must agree",
    )
    return p


def _positive(option: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{option} must be >= {minimum}, got {value}")


def _merge(args: argparse.Namespace) -> dict:
    from polykv_learn.eval.checks import check_out_dir, read_results
    from polykv_learn.eval.report import write_outputs
    from polykv_learn.eval.results import merge_results, replace_methods

    if args.resume:
        raise ValueError("--resume continues an evaluation run; --merge only joins finished ones")
    if args.replace and len(args.merge) != 2:
        raise ValueError(f"--replace takes exactly two runs, --merge BASE UPDATE; got {len(args.merge)}")
    check_out_dir(args.out)
    parts = [read_results(folder) for folder in args.merge]
    try:
        results = replace_methods(*parts) if args.replace else merge_results(parts)
    except ValueError as err:
        raise ValueError(f"--merge: {err}") from None
    write_outputs(results, args.out)
    print(f"merged {len(parts)} runs, {results['timing']['samples']} samples; outputs in {args.out}")
    return results


def _artifact(option: str, folder: str | None):
    from polykv_learn.deploy.polykv import PolyKV

    if folder is None:
        return None
    try:
        return PolyKV.from_pretrained(folder)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{option}: {err}") from None


def _samples(args: argparse.Namespace) -> list[dict]:
    from polykv_learn.data.jsonl import load_samples
    from polykv_learn.eval.results import select_samples

    if not Path(args.data).is_file():
        raise FileNotFoundError(
            f"--data {args.data} is not a file (make the task files with `polykv-learn prepare-data`, or give a JSONL)"
        )
    try:
        selected = select_samples(load_samples(args.data), _names(args.tasks), args.limit, _shard(args.shard))
    except ValueError as err:
        raise ValueError(f"--shard: {err}" if str(err).startswith("shard") else str(err)) from None
    if not selected:
        raise ValueError(f"no samples to evaluate in {args.data} (check --tasks, --limit and --shard)")
    return selected


def evaluate_main(argv: Sequence[str]) -> dict:
    """Entry point of ``polykv-learn evaluate``; returns the results dict (also written to ``--out``).

    Bad input raises a one-line ``ValueError``, ``FileNotFoundError`` or ``PermissionError`` before the model
    loads (see the epilog for what is checked)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.merge:
        return _merge(args)
    from polykv_learn.eval.checks import (
        artifact_digest,
        check_out_dir,
        check_router_fits,
        fit_contexts,
        model_config,
    )

    check_out_dir(args.out)
    _positive("--limit", args.limit)
    _positive("--threads", args.threads)
    _positive("--batch-size", args.batch_size)
    _positive("--group-size", args.group_size)
    _positive("--max-context", args.max_context, 2)
    for budget in args.budgets or ():
        _positive("--budgets", budget)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    from polykv_learn import onednn
    from polykv_learn.capture import CaptureOptions
    from polykv_learn.eval.evaluator import DEFAULT_BUDGETS, EvalSettings, Evaluator
    from polykv_learn.eval.methods import available_methods, resolve_methods
    from polykv_learn.eval.runner import run_config, run_evaluation, run_header
    from polykv_learn.eval.samples_log import SamplesLog
    from polykv_learn.models import SMOLLM2, load_model, load_tokenizer
    from polykv_learn.policies import get_policy

    router_dir = args.router
    if router_dir is None and not args.no_router and DEFAULT_ROUTER.is_dir():
        router_dir = str(DEFAULT_ROUTER)
    router = _artifact("--router", router_dir)
    gbdt = _artifact("--gbdt-router", args.gbdt_router)
    try:
        methods = resolve_methods(_names(args.methods), available_methods(router, gbdt))
    except ValueError as err:
        raise ValueError(f"--methods: {err}") from None
    samples = _samples(args)

    artifacts = [a for a in (router, gbdt) if a is not None]
    if len({(a.capture.window, a.capture.future, a.capture.chunk) for a in artifacts}) > 1:
        raise ValueError("--router and --gbdt-router were trained with different capture options; evaluate them apart")
    base = artifacts[0].capture if artifacts else CaptureOptions()
    needs_h2o = any(get_policy(p).needs_accumulated_attn for a in artifacts for p in a.policies) or any(
        m.kind == "single" and get_policy(m.name).needs_accumulated_attn for m in methods
    )
    capture = CaptureOptions(base.window, base.future, needs_h2o, base.chunk)

    model_name = args.model or (artifacts[0].model_fingerprint["name"] if artifacts else SMOLLM2)
    model_cfg = model_config(model_name)
    for option, artifact in (("--router", router), ("--gbdt-router", gbdt)):
        if artifact is not None:
            check_router_fits(artifact, model_cfg, option)
    tokenizer = load_tokenizer(model_name)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise ValueError("--chat needs a tokenizer with a chat template; this one has none (use --no-chat)")
    settings = EvalSettings(
        budgets=tuple(args.budgets or DEFAULT_BUDGETS),
        query_aware=args.query_aware,
        # default: the chat template whenever the tokenizer has one
        chat=has_template if args.chat is None else args.chat,
        max_context=args.max_context,
        batch_size=args.batch_size,
        group_size=args.group_size,
    )
    cut = fit_contexts(tokenizer, settings, samples, model_cfg.max_position_embeddings)
    if cut:
        print(f"--max-context {args.max_context}: {cut} of {len(samples)} samples have their context cut in the middle")

    onednn.set_enabled(not args.no_onednn)
    config = {
        "data": args.data,
        "router": router_dir,
        "gbdt_router": args.gbdt_router,
        "model_name": model_name,
        "tasks": _names(args.tasks),
        "limit": args.limit,
        "shard": args.shard,
        "matmul": "onednn" if onednn.enabled() else "default",
    }
    fingerprint = {"router_files": artifact_digest(router_dir), "gbdt_router_files": artifact_digest(args.gbdt_router)}
    header = run_header(run_config(config, settings, methods, capture), settings, samples, fingerprint)
    log = SamplesLog.prepare(args.out, header, args.resume)

    model, _ = load_model(
        model_name, attn_implementation=args.attn, with_tokenizer=False, onednn_linear=not args.no_onednn
    )
    for a in artifacts:
        a.check_model(model)
    evaluator = Evaluator(model, tokenizer, methods, settings, capture)
    start = time.perf_counter()
    results = run_evaluation(evaluator, samples, args.out, config=config, progress=not args.no_progress, log=log)
    elapsed = time.perf_counter() - start
    budgets = [str(b) for b in settings.budgets]
    done = len(samples) - len(log.done)
    print(f"\n{len(samples)} samples ({done} evaluated now), {elapsed:.1f} s, {settings.protocol}")
    print("average score".ljust(22) + "".join(f"B={b}".rjust(10) for b in budgets))
    for name, per_budget in results["summary"].items():
        cells = "".join(
            ("–" if per_budget[b]["average"] is None else f"{per_budget[b]['average']:.3f}").rjust(10) for b in budgets
        )
        print(name.ljust(22) + cells)
    for name, per_budget in results["gap_recovery"].items():
        cells = "".join(
            ("–" if per_budget[b]["gap_recovery"] is None else f"{100 * per_budget[b]['gap_recovery']:.1f}%").rjust(10)
            for b in budgets
        )
        print(f"gap recovery {name}".ljust(22) + cells)
    print(f"outputs in {args.out}")
    return results


if __name__ == "__main__":
    evaluate_main(sys.argv[1:])
