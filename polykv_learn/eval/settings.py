"""The options of ``polykv-learn evaluate``: the fields of :class:`EvaluateOptions` (type, default and help of
each in one place), read by a jsonargparse parser from ``--config FILE.yaml`` files and the command line.

:func:`parse_options` gives the options of an argument list without running anything (no model, no files but the
config files). Order of precedence, lowest first: the field defaults, the ``--config`` files in the order given
(a later file overrides an earlier one field by field; a list is replaced whole), then the command-line flags,
wherever they stand relative to the ``--config`` options. ``--print_config`` prints the resolved options as YAML
(a file that ``--config`` reads back to the same options) and exits.

Every option is spelled ``--field_name``; the spellings of the earlier argparse command keep working
(:func:`normalize_argv`): dashes for underscores (``--batch-size``), the negations ``--no-router``,
``--no-chat``, ``--no-onednn``, ``--no-progress``, bare booleans (``--resume`` for ``--resume true``), and lists
as separate words (``--budgets 128 256`` for ``--budgets [128,256]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from polykv_learn.capture import RECONSTRUCT_SCOPES
from polykv_learn.eval.evaluator import EvalSettings
from polykv_learn.eval.methods import ORACLE_ROUNDS

__all__ = ["DEFAULT_ROUTER", "EvaluateOptions", "build_parser", "normalize_argv", "parse_options"]

DEFAULT_ROUTER = Path("checkpoints/smollm2-135m")
AUTO = "auto"  # the router value meaning "DEFAULT_ROUTER if that folder exists"
_EVAL = EvalSettings()  # the evaluator's own defaults (batch sizes, budgets, protocol)


def _opt(default: Any, doc: str, negation: str | None = None) -> Any:
    """A field of :class:`EvaluateOptions`: its default, its help text and the earlier ``--no-...`` flag, if any."""
    metadata = {"doc": doc, "negation": negation}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class EvaluateOptions:
    """Every option of ``polykv-learn evaluate`` (a config file holds any of these fields)."""

    data: str = _opt(
        "data/polykv/tasks/test.jsonl", "JSONL samples (made by `polykv-learn prepare-data`; schema below)"
    )
    out: str | None = _opt(None, "output folder (results.json, results.md, plots, samples.jsonl); required")
    router: str | None = _opt(
        AUTO,
        f"trained artifact folder for polykv/polykv-heads/polykv-static; `{AUTO}`: {DEFAULT_ROUTER} if that folder "
        "exists; null (or --no-router): no router, baselines only",
        negation="--no-router",
    )
    gbdt_router: str | None = _opt(None, "artifact folder of a GBDT router (enables polykv-gbdt)")
    model: str | None = _opt(None, "model name or local HF folder; null: the router's model, else smollm2-135m")
    methods: list[str] | None = _opt(
        None,
        "methods to run (see below; a word may also be comma separated); null: every available one except the "
        "random control and oracle",
    )
    budgets: list[int] = _opt(
        list(_EVAL.budgets), "average budgets B: kept positions per KV head and layer, all kept positions counted"
    )
    tasks: list[str] | None = _opt(None, "only these task names (a word may also be comma separated); null: all")
    limit: int | None = _opt(None, "at most N samples per task (quick runs); null: all")
    shard: str = _opt(
        "0/1", "I/K: only every K-th selected sample of each task, from the I-th (K parallel runs, joined by --merge)"
    )
    query_aware: bool = _opt(
        _EVAL.query_aware,
        "compress context + question (SnapKV-paper/KVCache-Factory style) instead of the context alone",
    )
    chat: bool | None = _opt(
        None,
        "wrap context + question in the tokenizer's chat template (user turn; the answer prefix starts the assistant "
        "turn); false (or --no-chat): plain text prompt `context\\n\\nquestion\\nanswer_prefix`; null: the template "
        "whenever the tokenizer has one (SmolLM2-Instruct does: without it the model often ends its answer at once)",
        negation="--no-chat",
    )
    max_context: int | None = _opt(
        _EVAL.max_context,
        "cut contexts longer than this many tokens in the middle (first and last halves kept); null: no cut, and a "
        "sample longer than the model's positions stops the run before the model loads",
    )
    oracle_rounds: int = _opt(
        ORACLE_ROUNDS,
        "most improvement rounds of the `oracle` plan search per sample and budget (each round scores about "
        "L * (3 + policies) plans through the simulator); 0: the best single policy",
    )
    kvzip_scope: str | None = _opt(
        None,
        "the scores of KVzip's reconstruction pass (kvzip, kvzip-global, oracle, routers that use KVzip): `full` "
        "(exact: every query attends to the whole context and pass) or `chunk` (KVzip's / kvpress's chunk-local "
        "definition, 2048-token chunks, 4 sinks; cheaper); null: the router's (`full` without one)",
    )
    batch_size: int = _opt(
        _EVAL.batch_size,
        "compressed caches decoded together as one batch (the default holds every method and budget of a sample; "
        "their linear layers run as one matrix product)",
    )
    group_size: int = _opt(
        _EVAL.group_size,
        "caches of similar size whose keys are padded together for attention (memory grows with this times the "
        "longest cache in a group)",
    )
    attn: Literal["sdpa", "eager"] = _opt("sdpa", "base attention implementation")
    onednn: bool = _opt(
        True,
        "float32 products through oneDNN (polykv_learn/onednn.py); false (or --no-onednn): torch's default BLAS "
        "(MKL), the same results up to rounding",
        negation="--no-onednn",
    )
    threads: int | None = _opt(
        None,
        "torch CPU threads; null: torch's own choice. On a shared or busy machine use 1: oversubscribed OpenMP "
        "threads can make every matmul many times slower",
    )
    progress: bool = _opt(True, "show a progress bar; false (or --no-progress): none", negation="--no-progress")
    resume: bool = _opt(
        False,
        "continue the stopped run in --out from its samples.jsonl (the same options; refused if they differ): "
        "finished samples are skipped, every output is rebuilt from all samples. Without it, an --out that holds an "
        "earlier run's samples.jsonl is refused",
    )
    merge: list[str] | None = _opt(
        None,
        "no evaluation: merge the results.json of these --out folders (runs of one configuration on disjoint "
        "samples, e.g. one process per task) into --out, recomputing every summary",
    )
    replace: bool = _opt(
        False,
        "with --merge BASE UPDATE: take UPDATE's methods (e.g. --methods polykv polykv-static with a retrained "
        "--router) from UPDATE and every other method from BASE; same samples, full-cache results must agree",
    )

    def router_dir(self) -> str | None:
        """The router folder to load: ``router``, with ``auto`` resolved (None: no router)."""
        if self.router == AUTO:
            return str(DEFAULT_ROUTER) if DEFAULT_ROUTER.is_dir() else None
        return self.router

    def shard_pair(self) -> tuple[int, int]:
        """``shard`` as ``(I, K)``; a one-line ``ValueError`` unless it is two integers ``I/K``."""
        index, sep, count = self.shard.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"--shard must be I/K (e.g. 0/2), got {self.shard!r}")
        return int(index), int(count)

    def check(self) -> None:
        """One-line ``ValueError`` for an option out of range (nothing is read, nothing loads)."""
        if self.out is None:
            raise ValueError("--out is required: the output folder (or `out:` in a --config file)")
        if self.replace and not self.merge:
            raise ValueError("--replace works only with --merge BASE UPDATE")
        for option, value, minimum in (
            ("--limit", self.limit, 1),
            ("--threads", self.threads, 1),
            ("--batch-size", self.batch_size, 1),
            ("--oracle-rounds", self.oracle_rounds, 0),
            ("--group-size", self.group_size, 1),
            ("--max-context", self.max_context, 2),
            *(("--budgets", b, 1) for b in self.budgets),
        ):
            if value is not None and value < minimum:
                raise ValueError(f"{option} must be >= {minimum}, got {value}")
        if not self.budgets:
            raise ValueError("--budgets needs at least one budget")
        if self.kvzip_scope is not None and self.kvzip_scope not in RECONSTRUCT_SCOPES:
            allowed = ", ".join(repr(s) for s in RECONSTRUCT_SCOPES)
            raise ValueError(f"--kvzip_scope must be null or one of {allowed}, got {self.kvzip_scope!r}")
        self.shard_pair()


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(EvaluateOptions)}
_TYPES: dict[str, Any] = typing.get_type_hints(EvaluateOptions)
_BOOL_WORDS = {"true", "false", "yes", "no", "null"}


def _inner(tp: Any) -> tuple[Any, bool]:
    """``tp`` without ``| None``, and whether it allowed None."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _kind(name: str) -> str:
    tp, _ = _inner(_TYPES[name])
    if tp is bool:
        return "bool"
    return "list" if typing.get_origin(tp) is list else "scalar"


def describe(name: str) -> str:
    """What field ``name`` takes, in words (error messages)."""
    tp, optional = _inner(_TYPES[name])
    origin = typing.get_origin(tp)
    if origin is list:
        item = typing.get_args(tp)[0]
        text = "a list of integers, e.g. [128, 256]" if item is int else "a list of strings, e.g. [a, b]"
    elif origin is Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(tp)))
    else:
        text = {bool: "true or false", int: "an integer", str: "a string"}[tp]
    return f"{text} or null" if optional else text


EPILOG = """\
config files: --config FILE.yaml holds any of the fields above as `field: value` (e.g. `budgets: [128, 256]`,
`chat: false`); give --config several times and a later file overrides an earlier one; command-line flags
override every file. --print_config prints the resolved options as YAML (a file --config reads back) and exits.
Paths in a config file, as on the command line, are relative to the folder the command runs in.
configs/eval-smollm2.yaml holds the README's headline evaluation (scripts/evaluate_smollm2.sh).
Earlier spellings still work: --batch-size etc. for --batch_size, --no-router / --no-chat / --no-onednn /
--no-progress for --router null / --chat false / --onednn false / --progress false, a bare --resume for
--resume true, and lists as words (--budgets 128 256, --methods a b or a,b) for --budgets [128,256].

methods (--methods; default: every available one except the `random` control and `oracle`):
  full                 no eviction (always run: the reference of KL and gap recovery)
  snapkv streaming h2o tova knorm expected_attention keydiff kvzip
                       one policy at every layer with the uniform budget B (`random` as a control)
  pyramid              PyramidKV linear layer schedule, SnapKV scores
  cake                 CAKE entropy x variance layer allocation, SnapKV scores
  kvzip-global         KVzip's global top-k allocation across layers, KVzip scores
  kvzip-global-heads   the same top-k across layers and KV heads (KVzip's own per-head selection), KVzip scores
  adakv                AdaKV head-wise budgets within each layer (uniform B), SnapKV scores
  adakv-global         AdaKV head-wise budgets from one top-k across layers and heads, SnapKV scores
  polykv               the learned router/allocator of --router, adaptive (plan from this prefill)
  polykv-heads         polykv's plan, each layer then split among its KV heads: by the router's learned head
                       allocator when it has one, else by AdaKV (its own policy's scores)
  polykv-static        the same artifact's static plan (one plan per budget)
  polykv-gbdt          the GBDT router of --gbdt_router, adaptive
  oracle               NOT deployable, an upper bound of the policy pool: a simulator plan search on each
                       sample's own gold answer (slow, never a default)

protocols: query-agnostic (default) compresses the context alone, then asks the question;
--query_aware compresses context + question, then feeds only the answer prefix.

outputs in --out: results.json (summary: method -> budget -> task -> mean score and "average";
full_cache; gap_recovery and gap_recovery_test_only per method and budget; summary_nll, summary_kl;
example_plans; needle_retention: the share of the gold answer's context tokens each plan keeps, per
method, budget and task and per layer, over the samples whose first gold answer occurs in the context,
the others counted as excluded; samples: one record per sample/method/budget with id, task, method, budget,
prediction, score, nll, kl, context_tokens, kept, kv_bytes, needle_tokens, needle_retention and
needle_retention_layers), results.md, score_vs_budget.png, plan_map.png, needle_retention.png; and
samples.jsonl, written as the run goes (its settings, then one line per finished sample): a stopped run
continues with --resume, which skips the samples it holds and rebuilds every output from all of them.

checked before the model loads: the options and config files, --out (a folder that can be written), every
--data line, budgets, methods, the router artifacts, and the length of every sample: one that needs more
positions than the model has (max_position_embeddings) stops the run unless --max_context cuts it.

JSONL schema (--data): one object per line with context, question, answers (list of strings), metric
(string_match, qa_f1, rouge_l, classification, code_sim); optional task, id, answer_prefix, max_new_tokens,
all_classes.
"""


class _Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (type and default of every option) with the epilog kept as written."""


def build_parser() -> ArgumentParser:
    """The jsonargparse parser of :class:`EvaluateOptions` plus ``--config`` (and jsonargparse's
    ``--print_config``); it raises instead of exiting on a bad argument."""
    parser = ArgumentParser(
        prog="polykv-learn evaluate",
        description="Evaluate KV-cache eviction methods (single policies, PyramidKV, CAKE, the learned PolyKV\n"
        "router) at fixed average budgets with real compressed caches and greedy decoding. One full prefill\n"
        "per sample is shared by every method and budget.",
        epilog=EPILOG,
        formatter_class=_Formatter,
        exit_on_error=False,
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="YAML file of options (`field: value`); repeatable: later files override earlier ones, command-line "
        "flags override every file",
    )
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        parser.add_argument(f"--{name}", type=_TYPES[name], default=default, help=f.metadata["doc"])
    return parser


def _option_like(token: str) -> bool:
    """Whether ``token`` is an option (not a value such as ``-1``)."""
    return token.startswith("-") and not re.fullmatch(r"-\d+(\.\d*)?", token)


def _flow_list(name: str, values: Sequence[str]) -> str:
    """Words given after a list option as one YAML flow list; integer fields keep their numbers unquoted (any
    other word is quoted, so that jsonargparse names it in its type error)."""
    ints = typing.get_args(_inner(_TYPES[name])[0])[0] is int
    items = [v if ints and re.fullmatch(r"[+-]?\d+", v) else json.dumps(v) for v in values]
    return "[" + ", ".join(items) + "]"


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """The argument list in jsonargparse's spelling (see the module docstring), every ``--config FILE`` first."""
    configs, rest = _split_argv(argv)
    return [a for path in configs for a in ("--config", path)] + rest


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The ``--config`` files in order, and the other arguments in jsonargparse's spelling."""
    negations = {f.metadata["negation"]: n for n, f in FIELDS.items() if f.metadata["negation"]}
    configs: list[str] = []
    out: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in negations:
            name = negations[token]
            out.append(f"--{name}={'false' if _kind(name) == 'bool' else 'null'}")
            continue
        if not token.startswith("--"):
            out.append(token)
            continue
        flag, eq, value = token.partition("=")
        name = flag[2:].replace("-", "_")
        if name == "config":
            if eq:
                configs.append(value)
            elif i < len(argv):
                configs.append(argv[i])
                i += 1
            else:
                out.append("--config")  # no file: jsonargparse says so
            continue
        if name not in FIELDS:
            out.append(token)  # --help, --print_config, or an unknown option jsonargparse reports
            continue
        kind = _kind(name)
        if eq:
            listed = kind == "list" and not value.lstrip().startswith("[")
            out.append(f"--{name}={_flow_list(name, [value]) if listed else value}")
        elif kind == "bool":
            if i < len(argv) and argv[i].lower() in _BOOL_WORDS:
                out.append(f"--{name}={argv[i]}")
                i += 1
            else:
                out.append(f"--{name}=true")
        elif kind == "list":
            values = []
            while i < len(argv) and not _option_like(argv[i]):
                values.append(argv[i])
                i += 1
            if len(values) == 1 and values[0].lstrip().startswith("["):
                out.append(f"--{name}={values[0]}")
            else:
                out.append(f"--{name}={_flow_list(name, values)}" if values else f"--{name}")
        elif i < len(argv) and not _option_like(argv[i]):
            out.append(f"--{name}={argv[i]}")
            i += 1
        else:
            out.append(f"--{name}")  # no value: jsonargparse says so
    return configs, out


def _one_line(err: Exception, where: str = "") -> ValueError:
    """A jsonargparse error as a one-line ``ValueError`` that names the field, what it takes and what it got."""
    text = str(err)
    key = re.match(r'Parser key "(\w+)"', text)
    got = re.findall(r"(?:Given|Got) value: (.*)", text)
    if key and key[1] in FIELDS and got:
        return ValueError(f"{where}{key[1]} (--{key[1]}) must be {describe(key[1])}, got {got[-1].strip()}")
    lines = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if lines.startswith("unrecognized arguments"):
        lines += " (polykv-learn evaluate --help lists the options)"
    return ValueError(where + lines)


def _check_config_file(path: str) -> None:
    """A ``--config`` file: readable YAML, a mapping whose keys are fields (one-line errors naming the file)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path} is not a file (give a YAML file of evaluate options)")
    try:
        content = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"--config {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} cannot be read ({err})") from None
    if content is None:
        return
    if not isinstance(content, dict):
        raise ValueError(
            f"--config {path} must be a mapping of evaluate options (`field: value` lines), not a YAML "
            f"{type(content).__name__}"
        )
    unknown = [str(k) for k in content if k not in FIELDS]
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, FIELDS, 1)) else
                 repr(k) for k in unknown]  # fmt: skip
        raise ValueError(f"--config {path}: unknown field {', '.join(hints)}; the fields: {', '.join(FIELDS)}")


def parse_options(argv: Sequence[str]) -> EvaluateOptions:
    """The options of an ``evaluate`` argument list (``--help`` and ``--print_config`` print and exit). Bad
    options raise a one-line ``ValueError`` (a missing config file a ``FileNotFoundError``); :meth:`EvaluateOptions.
    check` is not called."""
    configs, rest = _split_argv(argv)
    parser = build_parser()
    for path in configs:
        _check_config_file(path)
        try:
            parser.parse_args(["--config", path])
        except argparse.ArgumentError as err:
            raise _one_line(err, f"--config {path}: ") from None
    try:
        namespace = parser.parse_args([a for path in configs for a in ("--config", path)] + rest)
    except argparse.ArgumentError as err:
        raise _one_line(err) from None
    values = {name: namespace[name] for name in FIELDS}
    for name in ("methods", "tasks"):
        if values[name] is not None:
            values[name] = [v for value in values[name] for v in str(value).split(",") if v]
    return EvaluateOptions(**values)
