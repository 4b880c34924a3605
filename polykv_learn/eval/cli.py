"""``polykv-learn evaluate``: every method and budget on an offline LongBench-style suite (or your JSONL).

polykv-learn evaluate --out out/eval                               # test split, all methods, B = 128..1024
polykv-learn evaluate --out out/eval-aware --query_aware           # the question is compressed too
polykv-learn evaluate --data my.jsonl --methods full snapkv polykv --budgets 256 --limit 5 --out out/mine
polykv-learn evaluate --config configs/eval-smollm2.yaml --tasks passkey --out out/passkey   # a config + flags

The options, their defaults and help are the fields of :class:`~polykv_learn.eval.settings.EvaluateOptions`
(``--config FILE.yaml``, ``--print_config``; see ``evaluate --help``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings import torch (through the evaluator's defaults): loaded when the command runs
    from polykv_learn.eval.settings import EvaluateOptions


def _merge(args: EvaluateOptions) -> dict:
    from polykv_learn.eval.checks import check_out_dir, read_results
    from polykv_learn.eval.report import write_outputs
    from polykv_learn.eval.results import merge_results, replace_methods

    assert args.out is not None and args.merge is not None  # EvaluateOptions.check
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


def _samples(args: EvaluateOptions) -> list[dict]:
    from polykv_learn.data.jsonl import load_samples
    from polykv_learn.eval.results import select_samples

    if not Path(args.data).is_file():
        raise FileNotFoundError(
            f"--data {args.data} is not a file (make the task files with `polykv-learn prepare-data`, or give a JSONL)"
        )
    try:
        selected = select_samples(load_samples(args.data), args.tasks, args.limit, args.shard_pair())
    except ValueError as err:
        raise ValueError(f"--shard: {err}" if str(err).startswith("shard") else str(err)) from None
    if not selected:
        raise ValueError(f"no samples to evaluate in {args.data} (check --tasks, --limit and --shard)")
    return selected


def eval_capture(artifacts: Sequence, methods: Sequence, kvzip_scope: str | None = None):
    """The one ``CaptureOptions`` of an evaluation: the artifacts' window/future/chunk (they must agree), H2O's
    accumulation and KVzip's reconstruction pass when a method or artifact needs them; the pass's scope is
    ``kvzip_scope`` (``--kvzip_scope``) if given, else the artifact's (``full`` without one)."""
    from polykv_learn.capture import CaptureOptions
    from polykv_learn.eval.methods import KVZIP_POLICY
    from polykv_learn.policies import get_policy

    if len({(a.capture.window, a.capture.future, a.capture.chunk) for a in artifacts}) > 1:
        raise ValueError("--router and --gbdt-router were trained with different capture options; evaluate them apart")
    base = artifacts[0].capture if artifacts else CaptureOptions()
    if kvzip_scope is None and len({a.capture.reconstruct_scope for a in artifacts}) > 1:
        raise ValueError("--router and --gbdt-router score KVzip with different scopes; give --kvzip_scope")
    used = [get_policy(p) for a in artifacts for p in a.policies]
    used += [get_policy(m.name) for m in methods if m.kind == "single"]
    used += [get_policy(KVZIP_POLICY) for m in methods if m.name in ("kvzip-global", "kvzip-global-heads")]
    oracle = any(m.kind == "oracle" for m in methods)  # the search's pool includes H2O and KVzip
    needs_h2o = oracle or any(p.needs_accumulated_attn for p in used)
    needs_zip = oracle or any(p.needs_reconstruct_attn for p in used) or any(a.capture.reconstruct for a in artifacts)
    scope: dict = {}
    if kvzip_scope == "chunk" or (kvzip_scope is None and base.reconstruct_scope == "chunk"):
        scope = {"reconstruct_scope": "chunk"}
        if base.reconstruct_scope == "chunk":  # the artifact's chunk size and sinks
            scope["reconstruct_context_chunk"] = base.reconstruct_context_chunk
            scope["reconstruct_sinks"] = base.reconstruct_sinks
    return CaptureOptions(base.window, base.future, needs_h2o, base.chunk, reconstruct=needs_zip, **scope)


def evaluate_main(argv: Sequence[str]) -> dict:
    """Entry point of ``polykv-learn evaluate``; returns the results dict (also written to ``--out``).

    Bad input raises a one-line ``ValueError``, ``FileNotFoundError`` or ``PermissionError`` before the model
    loads (see the epilog for what is checked). ``--help`` and ``--print_config`` print and exit (``SystemExit``)."""
    from polykv_learn.eval.settings import parse_options

    args = parse_options(argv)
    args.check()
    if args.merge:
        return _merge(args)
    from polykv_learn.eval.checks import (
        artifact_digest,
        check_out_dir,
        check_router_fits,
        fit_contexts,
        model_config,
    )

    assert args.out is not None  # EvaluateOptions.check
    check_out_dir(args.out)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    from polykv_learn import onednn
    from polykv_learn.eval.evaluator import EvalSettings, Evaluator
    from polykv_learn.eval.methods import available_methods, resolve_methods
    from polykv_learn.eval.runner import run_config, run_evaluation, run_header
    from polykv_learn.eval.samples_log import SamplesLog
    from polykv_learn.models import SMOLLM2, load_model, load_tokenizer

    router_dir = args.router_dir()
    router = _artifact("--router", router_dir)
    gbdt = _artifact("--gbdt-router", args.gbdt_router)
    try:
        methods = resolve_methods(args.methods, available_methods(router, gbdt, oracle_rounds=args.oracle_rounds))
    except ValueError as err:
        raise ValueError(f"--methods: {err}") from None
    samples = _samples(args)

    artifacts = [a for a in (router, gbdt) if a is not None]
    capture = eval_capture(artifacts, methods, args.kvzip_scope)

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
        budgets=tuple(args.budgets),
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

    onednn.set_enabled(args.onednn)
    config = {
        "data": args.data,
        "router": router_dir,
        "gbdt_router": args.gbdt_router,
        "model_name": model_name,
        "tasks": args.tasks,
        "limit": args.limit,
        "shard": args.shard,
        "matmul": "onednn" if onednn.enabled() else "default",
    }
    if any(m.kind == "oracle" for m in methods):  # recorded only then: other runs keep their earlier config
        config["oracle_rounds"] = args.oracle_rounds
    fingerprint = {"router_files": artifact_digest(router_dir), "gbdt_router_files": artifact_digest(args.gbdt_router)}
    header = run_header(run_config(config, settings, methods, capture), settings, samples, fingerprint)
    log = SamplesLog.prepare(args.out, header, args.resume)

    model, _ = load_model(model_name, attn_implementation=args.attn, with_tokenizer=False, onednn_linear=args.onednn)
    for a in artifacts:
        a.check_model(model)
    evaluator = Evaluator(model, tokenizer, methods, settings, capture)
    start = time.perf_counter()
    results = run_evaluation(evaluator, samples, args.out, config=config, progress=args.progress, log=log)
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
