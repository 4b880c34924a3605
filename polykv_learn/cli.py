"""``polykv-learn`` command line.

polykv-learn prepare-data --out data/polykv             # offline corpus + evaluation tasks
polykv-learn fit --config configs/smollm2-135m.yaml     # Lightning CLI: every field overridable
polykv-learn generate --router checkpoints/smollm2-135m --budget 128 --prompt-file prompt.txt
polykv-learn evaluate --router checkpoints/smollm2-135m --out results/   # see `evaluate --help`
polykv-learn calibrate --config configs/calibrate-smollm2.yaml   # calibrated static plans (JSON, artifact copy)

Expected errors (bad arguments, missing or corrupt files) print one line, `polykv-learn <command>: error: ...`,
and exit with status 2; add --debug anywhere (or set POLYKV_DEBUG=1) to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polykv_learn.deploy.polykv import PolyKV

#: errors that mean "bad input": reported in one line (exit status 2) unless --debug is given
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
DEBUG_FLAG = "--debug"
DEBUG_ENV = "POLYKV_DEBUG"


def _fit(argv: Sequence[str]) -> None:
    """``fit`` / ``validate`` (``argv`` starts with the subcommand): the Lightning CLI of ``learn/fitcli.py``."""
    from polykv_learn.learn.fitcli import run_fit

    run_fit(list(argv))


def _calibrate(argv: Sequence[str]) -> None:
    from polykv_learn.calibrate_cli import run_calibrate

    report = run_calibrate(argv)
    artifact = report["config"]["artifact"]
    into = f" and the artifact {artifact}" if artifact else ""
    print(f"wrote {report['config']['out']}{into}: static plans for B = {', '.join(report['plans'])}")


def _prepare_data(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="polykv-learn prepare-data", description="Build the offline corpus and tasks.")
    p.add_argument("--out", default="data/polykv", help="output folder (corpus/, tasks/, manifest.json)")
    p.add_argument("--model", default="smollm2-135m", help="model whose tokenizer measures lengths")
    p.add_argument("--sources", default="bigbench,austen,python", help="comma-separated: bigbench, austen, python")
    p.add_argument("--max-docs-per-source", type=int, default=None)
    p.add_argument("--samples-per-task", type=int, default=50)
    p.add_argument("--synthetic-docs", type=int, default=300)
    p.add_argument("--min-context", type=int, default=512)
    p.add_argument("--max-context", type=int, default=4096, help="longest test task context (tokens)")
    p.add_argument(
        "--train-max-context",
        type=int,
        default=2048,
        help="longest training/validation task context (tokens; the fit skips longer ones: data.max_context_tokens)",
    )
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
        train_target_tokens=(min(max(args.min_context, 1024), args.train_max_context), args.train_max_context),
        samples_per_task=args.samples_per_task,
        synthetic_docs=args.synthetic_docs,
        chat=args.chat,
    )
    import json

    print(json.dumps(manifest, indent=2))


def _generate(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="polykv-learn generate", description="Generate with a compressed KV cache.")
    p.add_argument("--router", required=True, help="artifact folder (e.g. checkpoints/smollm2-135m)")
    p.add_argument("--budget", type=int, required=True, help="average kept positions per layer and KV head (>= 1)")
    p.add_argument("--prompt-file", required=True, help="UTF-8 text file with the prompt (the context + question)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (>= 1)")
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        metavar="N",
        help="cut a longer prompt to N tokens by dropping its middle (the number of tokens cut goes to stderr); "
        "without it a prompt longer than the model's positions minus --max-new-tokens is refused",
    )
    p.add_argument("--mode", choices=("adaptive", "static"), default="adaptive")
    p.add_argument(
        "--head-allocation",
        choices=("auto", "none", "adakv", "learned"),
        default="auto",
        help="split each layer's budget among its KV heads (adaptive mode): `learned` by the artifact's head "
        "allocator, `adakv` by AdaKV, `none` evenly; `auto`: the split the artifact was fitted for (`learned` or "
        "`adakv`) when the mode is adaptive, else `none`",
    )
    p.add_argument("--model", default=None, help="model to load (default: the one the router was trained for)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the tokenizer's chat template (default: when the tokenizer has one)",
    )
    args = p.parse_args(argv)
    for flag, value in (("--budget", args.budget), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be >= 1, got {args.max_context}")

    # every check before the model loads: the artifact, the prompt file, the model's positions, the prompt length
    from polykv_learn.deploy.polykv import PolyKV
    from polykv_learn.text import cut_middle

    polykv = PolyKV.from_pretrained(args.router)
    heads = args.head_allocation
    if heads == "auto":
        heads = polykv.head_allocation if args.mode == "adaptive" else "none"  # the split it was fitted for
    if heads != "none" and args.mode != "adaptive":
        raise ValueError(f"--head-allocation {heads} needs --mode adaptive (heads are split by the prefill's signals)")
    polykv.check_head_allocation(heads)
    text = read_prompt(args.prompt_file)
    model_name = args.model or polykv.model_fingerprint["name"]
    positions = _model_positions(model_name, polykv)
    room = positions - args.max_new_tokens  # prompt tokens that fit next to the generated ones
    if room < 1:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt: {model_name} has {positions} "
            "positions"
        )
    if args.max_context is not None and args.max_context > room:
        raise ValueError(
            f"--max-context {args.max_context} is more than the {room} prompt tokens that fit ({model_name} has "
            f"{positions} positions, minus --max-new-tokens {args.max_new_tokens})"
        )
    from polykv_learn.models import load_tokenizer

    tok = load_tokenizer(model_name)
    if args.chat or (args.chat is None and tok.chat_template):
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = list(tok(text, verbose=False).input_ids)  # verbose=False: no "longer than the model" warning, see below
    if not ids:
        raise ValueError(f"prompt file {args.prompt_file} gives no tokens")
    ids, cut = cut_middle(ids, args.max_context)
    if cut:
        print(
            f"polykv-learn generate: cut {cut} tokens from the middle of the prompt (kept {len(ids)}, --max-context "
            f"{args.max_context})",
            file=sys.stderr,
        )
    if len(ids) > room:
        raise ValueError(
            f"the prompt has {len(ids)} tokens but {model_name} has {positions} positions, so with --max-new-tokens "
            f"{args.max_new_tokens} at most {room} prompt tokens fit; shorten the prompt or pass --max-context N "
            f"(N <= {room}) to drop its middle"
        )

    import torch

    from polykv_learn import adapter
    from polykv_learn.cache import cache_bytes
    from polykv_learn.models import load_model

    model, _ = load_model(model_name, with_tokenizer=False)
    input_ids = torch.tensor([ids], dtype=torch.long)  # (1, n)
    cache = polykv.make_cache(model, budget=args.budget, mode=args.mode, head_allocation=heads)
    with torch.no_grad():
        out = model.generate(
            input_ids, **{adapter.cache_kwarg(model): cache}, max_new_tokens=args.max_new_tokens, do_sample=False
        )
    answer = tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
    plan = cache.applied_plan
    dims = polykv.model_fingerprint
    n_total = out.shape[1] - 1  # the last token is never written to the cache
    full = dims["num_layers"] * n_total * dims["num_kv_heads"] * dims["head_dim"] * 2 * model.dtype.itemsize
    held = cache_bytes(cache)
    print(answer)
    split = "" if heads == "none" else f", heads: {heads}"
    print(f"\n--- plan ({args.mode}, budget {args.budget}{split}, context {input_ids.shape[1]} tokens) ---")
    print(plan if plan is not None else "(no eviction)")
    print(f"\nKV bytes: {held:,} vs full {full:,} ({held / full:.1%})")


def read_prompt(path: str | Path) -> str:
    """The text of a prompt file; refuses a missing path, a folder, a binary or non-UTF-8 file and an empty one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"prompt file {path} is not a file")
    data = path.read_bytes()
    if b"\0" in data:
        raise ValueError(f"prompt file {path} is binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the prompt
    except UnicodeDecodeError as err:
        raise ValueError(
            f"prompt file {path} is not UTF-8 text (byte {err.start}: {err.reason}); give a UTF-8 text file"
        ) from None
    if not text.strip():
        raise ValueError(f"prompt file {path} is empty (or only whitespace)")
    return text


def _model_positions(name: str, polykv: PolyKV) -> int:
    """``max_position_embeddings`` of the model ``name``, without loading it: the router's fingerprint for the
    model it was trained for, otherwise the model's config. Refuses a name that is no model."""
    from polykv_learn.models import KNOWN_MODELS, TINY_CONFIGS

    if name not in KNOWN_MODELS and name not in TINY_CONFIGS and not (Path(name) / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} is neither a known model ({', '.join([*KNOWN_MODELS, *TINY_CONFIGS])}) nor a local "
            "Hugging Face model directory with a config.json"
        )
    if name == polykv.model_fingerprint["name"]:
        return int(polykv.model_fingerprint["max_positions"])
    if name in TINY_CONFIGS:
        return int(TINY_CONFIGS[name]().max_position_embeddings)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(KNOWN_MODELS[name]() if name in KNOWN_MODELS else name)
    return int(config.max_position_embeddings)


def _one_line(err: BaseException) -> str:
    """The message of an expected error on one line (OS errors as ``path: reason``)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror and len(err.args) == 2:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``polykv-learn``: dispatch to a command; expected errors become one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    from polykv_learn.eval.cli import evaluate_main

    commands: dict[str, Callable[[Sequence[str]], object]] = {
        "fit": lambda rest: _fit(["fit", *rest]),
        "validate": lambda rest: _fit(["validate", *rest]),
        "prepare-data": _prepare_data,
        "generate": _generate,
        "evaluate": evaluate_main,
        "calibrate": _calibrate,
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        print(f"commands: {', '.join(commands)}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    try:
        commands[command](rest)
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        print(f"polykv-learn {command}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
