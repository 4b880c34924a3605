"""The evaluation sweep: every method and budget on every sample, through real compressed caches.

Per sample (design §4, §7):

1. **One full prefill**, shared by every method and budget: the compressed prompt runs once through the model
   with a capture-only :class:`~polykv_learn.cache.CompressedCache` (full K/V plus every layer's scoring
   statistics). Eviction happens after the prefill, so this is exact: a method's compressed cache is what its
   own prefill would have produced.
2. For each method and budget, a **fork** of that cache whose layers reference the same K/V tensors is
   compressed with the method's plan (:meth:`CompressedCache.compress`). Eviction *gathers* the kept positions
   into new tensors, which the batch below copies into its own buffers, so the shared prefill is never written;
   the runner checks this on every sample through the tensors' version counters (any in-place write bumps them)
   and raises if it ever happens. Plans that keep the same positions (e.g. every layer's budget >= the context)
   are run once.
3. The forks, ordered by size, run as one batch (:class:`~polykv_learn.eval.fork_batch.ForkBatchCache`: shared
   linear layers, attention per group of forks, each group padded to its longest layer and masked): the prompt's
   tail (question and answer prefix, or the answer prefix alone) and the gold answer teacher-forced in one forward
   (gold-answer NLL and KL to the full cache over the answer positions), then the answer is dropped from the
   caches again and a manual greedy loop decodes until EOS, ``max_new_tokens`` or a settled answer
   (:func:`~polykv_learn.eval.metrics.answer_settled`), finished rows leaving the batch.

Protocols. *Query-agnostic* (default): the compressed prompt is the context alone; the question comes after the
compression (one compressed context could serve many questions; kvpress's default). *Query-aware*
(``query_aware=True``): the context and the question are compressed together; only the answer prefix follows.
The token sequence is the same in both protocols, so the full cache scores the same in both.

Prompt. Text mode: ``{context}\\n\\n{question}\\n{answer_prefix}``. Chat mode: the tokenizer's chat template
around ``{context}\\n\\n{question}`` as the user turn, the assistant turn opened, then ``{answer_prefix}``. The
pieces are tokenised separately and concatenated (so the prompt splits cleanly between what is compressed and
what follows). ``max_context`` cuts longer contexts in the middle (LongBench-style: first and last halves kept).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache, cache_bytes
from polykv_learn.capture import CaptureOptions
from polykv_learn.data.tasks import TEST_ONLY_TASKS
from polykv_learn.eval.fork_batch import ForkBatchCache, fork_of
from polykv_learn.eval.jsonl import atomic_write_text
from polykv_learn.eval.methods import LEARNED_METHODS, Method, MethodInput
from polykv_learn.eval.metrics import answer_settled, gap_recovery, score
from polykv_learn.plan import Plan
from polykv_learn.simulator import kl_to_full

__all__ = [
    "DEFAULT_BUDGETS",
    "EncodedSample",
    "EvalSettings",
    "Evaluator",
    "build_results",
    "gap_recovery_table",
    "merge_results",
    "replace_methods",
    "release_free_memory",
    "run_evaluation",
    "select_samples",
    "write_outputs",
]

DEFAULT_BUDGETS: tuple[int, ...] = (128, 256, 512, 1024)
#: a task counts as *scored* when the full cache averages at least this score on it: below, the model cannot do
#: the task even uncompressed, and its score differences between methods are noise (the issue's "keep only task
#: types on which the full-cache model scores meaningfully"); every task is still reported
MEANINGFUL_FULL_SCORE = 0.1
RESULT_FILES = ("results.json", "results.md", "score_vs_budget.png", "plan_map.png")


@dataclass(frozen=True)
class EvalSettings:
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    query_aware: bool = False
    chat: bool = False
    max_context: int | None = None
    batch_size: int = 64  # forks decoded together as one batch (their linear layers run as one matrix product)
    group_size: int = 8  # forks of similar size whose keys are padded together for attention (1: no padding)
    stop_when_settled: bool = True  # stop a row once more tokens cannot change its score (metrics.answer_settled)

    def __post_init__(self) -> None:
        if not self.budgets or any(isinstance(b, bool) or int(b) != b or b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be positive integers, got {list(self.budgets)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2 tokens, got {self.max_context}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def protocol(self) -> str:
        return "query-aware" if self.query_aware else "query-agnostic"


@dataclass
class EncodedSample:
    prompt_ids: Tensor  # (1, n) what is prefilled and compressed
    tail_ids: Tensor  # (1, m) fed after the compression, before the answer
    answer_ids: Tensor  # (1, a) the first gold answer, teacher-forced for NLL/KL
    context_tokens: int  # tokens of the context (after the max_context cut)
    cut_tokens: int  # tokens removed from the middle of the context by max_context


@dataclass
class _RowResult:
    prediction: str
    tokens: list[int]
    nll: float
    kl: float
    kv_bytes: int
    kept: float  # mean over layers of the context positions kept per KV head


@dataclass
class SampleResult:
    records: list[dict[str, Any]]
    plans: dict[str, dict[int, Plan | None]] = field(default_factory=dict)
    context_tokens: int = 0
    seconds: float = 0.0


def _cut_middle(ids: list[int], limit: int | None) -> tuple[list[int], int]:
    if limit is None or len(ids) <= limit:
        return ids, 0
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :], len(ids) - limit


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class Evaluator:
    """Runs every method and budget on one sample at a time (see the module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        methods: Sequence[Method],
        settings: EvalSettings,
        capture: CaptureOptions | None = None,
    ):
        if not methods or methods[0].name != "full":
            raise ValueError("the method list must start with 'full' (the reference of KL and gap recovery)")
        self.model = model
        self.tokenizer = tokenizer
        self.methods = list(methods)
        self.settings = settings
        self.capture = capture or CaptureOptions()
        self.dims = adapter.model_dims(model)
        self.eos = _eos_ids(model, tokenizer)
        if not self.eos:
            raise ValueError("the model and tokenizer define no EOS token to stop greedy decoding at")
        if settings.chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat needs a tokenizer with a chat template; this one has none")

    # --- prompt ---------------------------------------------------------------------------------------------------
    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def encode(self, sample: dict[str, Any]) -> EncodedSample:
        context, question, prefix = sample["context"], sample["question"], sample.get("answer_prefix", "")
        if self.settings.chat:
            user = f"{context}\n\n{question}"
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            at = rendered.index(user)
            header, footer = rendered[:at], rendered[at + len(user) :] + prefix
        else:
            header, footer = "", "\n" + prefix
        ctx, cut = _cut_middle(self._tok(context), self.settings.max_context)
        # an empty question (e.g. code completion): the answer directly continues the context
        head, q, foot = self._tok(header), self._tok(f"\n\n{question}" if question else ""), self._tok(footer)
        prompt, tail = (head + ctx + q, foot) if self.settings.query_aware else (head + ctx, q + foot)
        if not prompt or not tail:
            raise ValueError(f"sample {sample.get('id')!r}: the prompt and what follows it must both be non-empty")
        sep = " " if prefix and not prefix[-1].isspace() else ""
        answer = self._tok(sep + sample["answers"][0])
        if not answer:
            raise ValueError(f"sample {sample.get('id')!r}: the first gold answer is empty")

        def as_ids(ids: list[int]) -> Tensor:
            return torch.tensor([ids], dtype=torch.long, device=self.model.device)

        return EncodedSample(as_ids(prompt), as_ids(tail), as_ids(answer), len(ctx), cut)

    # --- caches ---------------------------------------------------------------------------------------------------
    def _fork(self, shared: CompressedCache) -> CompressedCache:
        return fork_of(shared, self.model)

    def _text(self, tokens: list[int]) -> str:
        """The generated text (before stripping) of greedy tokens."""
        return self.tokenizer.decode([t for t in tokens if t not in self.eos], skip_special_tokens=True)

    # --- one batch of plans -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(
        self,
        shared: CompressedCache,
        plans: Sequence[Plan | None],
        enc: EncodedSample,
        max_new_tokens: int,
        full_answer_logits: Tensor | None,
        metric: str | None = None,
        answers: Sequence[str] | None = None,
    ) -> tuple[list[_RowResult], Tensor]:
        n = enc.prompt_ids.shape[1]
        rows, m, a = len(plans), enc.tail_ids.shape[1], enc.answer_ids.shape[1]
        forks = []
        for plan in plans:
            fork = self._fork(shared)
            if plan is not None:
                fork.compress(plan)
            forks.append(fork)
        kv = [cache_bytes(f) for f in forks]
        kept = [sum(min(b, n) for b in p.budgets) / len(p.budgets) if p is not None else float(n) for p in plans]
        cache = ForkBatchCache(self.model, forks, self.settings.group_size, reserve=m + a + max_new_tokens)
        del forks

        # tail + gold answer, teacher-forced: logits predicting answer token 0..a-1 (row 0 also starts decoding)
        seq = torch.cat([enc.tail_ids, enc.answer_ids], dim=1).expand(rows, -1)
        logits = adapter.forward(self.model, seq, cache, logits_to_keep=a + 1).logits  # (P, a + 1, V)
        first = logits[:, 0].argmax(dim=-1)  # (P,) greedy first answer token
        full = logits[0, :a] if full_answer_logits is None else full_answer_logits  # (a, V)
        nll, kl = torch.empty(rows), torch.empty(rows)
        for i in range(0, rows, 8):  # a few rows at a time: bounded (rows, a, V) temporaries
            part = logits[i : i + 8, :a].float()  # (p, a, V)
            logp = F.log_softmax(part, dim=-1)
            nll[i : i + 8] = -logp.gather(-1, enc.answer_ids.expand(len(part), -1)[..., None])[..., 0].mean(dim=-1)
            kl[i : i + 8] = kl_to_full(full, part)
        full = full.float().clone()
        del logits
        cache.rewind(a)

        # greedy decoding; a row stops at EOS or once its answer is settled (same score whatever follows), and
        # leaves the batch then (live[i]: the plan of batch row i)
        settle = metric if self.settings.stop_when_settled else None
        tokens: list[list[int]] = [[] for _ in range(rows)]
        live = list(range(rows))
        next_tok = first
        for step in range(max_new_tokens):
            still = []
            for i, (r, t) in enumerate(zip(live, next_tok.tolist(), strict=True)):
                tokens[r].append(t)
                if t not in self.eos and not (settle and answer_settled(settle, self._text(tokens[r]), answers)):
                    still.append(i)
            if not still or step == max_new_tokens - 1:
                break
            if len(still) < len(live):
                cache.keep_rows(still)
                live, next_tok = [live[i] for i in still], next_tok[still]
            out = adapter.forward(self.model, next_tok[:, None], cache, logits_to_keep=1)
            next_tok = out.logits[:, -1].argmax(dim=-1)
        results = []
        for r in range(rows):
            text = self._text(tokens[r])
            results.append(_RowResult(text.strip(), tokens[r], float(nll[r]), float(kl[r]), kv[r], kept[r]))
        return results, full

    # --- one sample ---------------------------------------------------------------------------------------------
    @staticmethod
    def _plan_key(plan: Plan | None, n: int) -> tuple | None:
        """Identifies what a plan keeps for a context of ``n``: None when it keeps everything."""
        if plan is None or all(b >= n for b in plan.budgets):
            return None
        return tuple((p, b) if b < n else ("*", n) for p, b in plan)

    @torch.no_grad()
    def evaluate_sample(self, sample: dict[str, Any]) -> SampleResult:
        start = time.perf_counter()
        enc = self.encode(sample)
        n = enc.prompt_ids.shape[1]
        shared = CompressedCache(self.model, capture=self.capture)
        adapter.forward(self.model, enc.prompt_ids, shared, logits_to_keep=1)
        inp = MethodInput(shared.layer_stats)
        versions = [(layer.keys._version, layer.values._version) for layer in shared.layers]

        plans: dict[str, dict[int, Plan | None]] = {}
        jobs: dict[tuple | None, Plan | None] = {}
        for method in self.methods[1:]:
            plans[method.name] = {}
            for budget in self.settings.budgets:
                plan = method.plan(inp, budget)
                if plan is not None:
                    plan.check_num_layers(self.dims.num_layers)
                plans[method.name][budget] = plan
                jobs.setdefault(self._plan_key(plan, n), plan)
        max_new = int(sample["max_new_tokens"])

        metric = sample["metric"]
        answers = sample["answers"]
        full_rows, full_logits = self._run(shared, [None], enc, max_new, None, metric, answers)
        by_key: dict[tuple | None, _RowResult] = {None: full_rows[0]}
        # ordered by cache size: each attention group is padded to its longest fork, so mixing a plan that keeps
        # whole layers (up to n) with uniform small budgets in one group would multiply memory and time
        todo = sorted(
            ((k, p) for k, p in jobs.items() if k is not None), key=lambda kp: sum(min(b, n) for b in kp[1].budgets)
        )
        size = self.settings.batch_size
        for i in range(0, len(todo), size):
            chunk = todo[i : i + size]
            rows, _ = self._run(shared, [p for _, p in chunk], enc, max_new, full_logits, metric, answers)
            by_key.update({k: r for (k, _), r in zip(chunk, rows, strict=True)})
        after = [(layer.keys._version, layer.values._version) for layer in shared.layers]
        if after != versions:
            raise RuntimeError("evaluating the methods wrote into the shared prefill; results would be invalid")

        metric_kw = {"all_classes": sample.get("all_classes")}
        base = {"id": sample["id"], "task": sample["task"], "context_tokens": n}

        def record(method: str, budget: int | None, row: _RowResult) -> dict[str, Any]:
            return {
                **base,
                "method": method,
                "budget": budget,
                "prediction": row.prediction,
                "score": score(sample["metric"], row.prediction, sample["answers"], **metric_kw),
                "nll": row.nll,
                "kl": 0.0 if method == "full" else row.kl,
                "kept": row.kept,
                "kv_bytes": row.kv_bytes,
            }

        records = [record("full", None, full_rows[0])]
        for method in self.methods[1:]:
            for budget in self.settings.budgets:
                records.append(record(method.name, budget, by_key[self._plan_key(plans[method.name][budget], n)]))
        return SampleResult(records, plans, n, time.perf_counter() - start)


# --- the sweep --------------------------------------------------------------------------------------------------
def release_free_memory() -> bool:
    """Collect cyclic garbage, then return the allocator's free heap memory to the OS (glibc ``malloc_trim(0)``);
    False where trimming is unavailable.

    Each sample allocates and frees gigabytes of differently sized buffers (prefill statistics, padded fork
    batches). glibc keeps freed heap pages: on SmolLM2 an evaluation process's RSS swung between 2.3 and 3.4 GB
    after each sample although the live tensors stayed at 0.54 GB; trimming brings it back to 1.04 GB.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``); None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def select_samples(
    samples: Sequence[dict[str, Any]],
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[dict[str, Any]]:
    """Samples of the given tasks (all when None), at most ``limit`` per task, in file order; with ``shard=(i, k)``
    only every k-th of those per task, starting at the i-th (k disjoint shards that together are the selection,
    for parallel runs that :func:`merge_results` joins)."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be I/K with K >= 1 and 0 <= I < K, got {index}/{count}")
    if tasks is not None:
        present = {s["task"] for s in samples}
        unknown = [t for t in tasks if t not in present]
        if unknown:
            raise ValueError(f"task(s) {', '.join(map(repr, unknown))} not in the data; present: {sorted(present)}")
    counts: dict[str, int] = {}
    chosen = []
    for s in samples:
        if tasks is not None and s["task"] not in tasks:
            continue
        seen = counts.get(s["task"], 0)
        if limit is not None and seen >= limit:
            continue
        counts[s["task"]] = seen + 1
        if seen % count == index:
            chosen.append(s)
    return chosen


def run_evaluation(
    evaluator: Evaluator,
    samples: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every sample, build the results and (with ``out_dir``) write all outputs."""
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("no samples to evaluate (check --data, --tasks and --limit)")
    records: list[dict[str, Any]] = []
    example_plans: dict[str, dict[str, Any]] = {}
    seconds: list[float] = []
    bar = tqdm(samples, desc=f"evaluate ({evaluator.settings.protocol})", unit="sample", disable=not progress)
    for sample in bar:
        result = evaluator.evaluate_sample(sample)
        records.extend(result.records)
        seconds.append(result.seconds)
        release_free_memory()
        bar.set_postfix(n=result.context_tokens, s=f"{result.seconds:.1f}")
        for method, per_budget in result.plans.items():
            for budget, plan in per_budget.items():
                slot = example_plans.setdefault(method, {})
                if str(budget) not in slot and plan is not None and result.context_tokens > budget:
                    slot[str(budget)] = {
                        "sample": sample["id"],
                        "context_tokens": result.context_tokens,
                        **plan.to_dict(),
                    }
    methods = [m.name for m in evaluator.methods]
    singles = [m.name for m in evaluator.methods if m.kind == "single" and not m.name == "random"]
    results = build_results(records, methods, singles, evaluator.settings.budgets)
    results["config"] = {
        **(config or {}),
        "protocol": evaluator.settings.protocol,
        "budgets": list(evaluator.settings.budgets),
        "methods": methods,
        "chat": evaluator.settings.chat,
        "max_context": evaluator.settings.max_context,
        "capture": {"window": evaluator.capture.window, "future": evaluator.capture.future},
        "model": evaluator.dims.name,
    }
    results["example_plans"] = example_plans
    results["timing"] = {
        "samples": len(seconds),
        "seconds": sum(seconds),
        "seconds_per_sample": sum(seconds) / len(seconds),
    }
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs of the same configuration on disjoint samples (e.g. one process per task,
    which bounds each process's memory and lets a long evaluation resume from the parts already done): the
    summaries, gap recovery and tables are recomputed from the union of the per-sample records."""
    if not parts:
        raise ValueError("nothing to merge")
    cfg = parts[0]["config"]
    same = ("protocol", "budgets", "methods", "chat", "max_context", "model", "capture")
    for i, part in enumerate(parts[1:], 1):
        differ = [k for k in same if part["config"].get(k) != cfg.get(k)]
        if differ:
            raise ValueError(f"run {i} differs from run 0 in {', '.join(differ)}; only runs of one configuration merge")
    records = [r for part in parts for r in part["samples"]]
    keys = [(r["id"], r["method"], r["budget"]) for r in records]
    if len(set(keys)) != len(keys):
        raise ValueError("the runs share samples (same id, method and budget); merge runs on disjoint samples")
    results = build_results(records, cfg["methods"], parts[0]["single_policies"], cfg["budgets"])
    tasks = sorted({t for part in parts for t in part["tasks"]})  # the tasks each run evaluated
    per_run = ("tasks", "shard")  # what differs between the parts
    shared = {k: v for k, v in cfg.items() if k not in per_run}
    results["config"] = {**shared, "tasks": tasks, "merged_runs": len(parts)}
    example_plans: dict[str, dict[str, Any]] = {}
    for part in parts:
        for method, per_budget in part.get("example_plans", {}).items():
            for budget, plan in per_budget.items():
                example_plans.setdefault(method, {}).setdefault(budget, plan)
    results["example_plans"] = example_plans
    samples = sum(p["timing"]["samples"] for p in parts)
    seconds = sum(p["timing"]["seconds"] for p in parts)
    results["timing"] = {"samples": samples, "seconds": seconds, "seconds_per_sample": seconds / samples}
    return results


def replace_methods(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the methods ``update`` evaluated (other than ``full``) taken from ``update``: e.g. a retrained
    router re-evaluated with ``--methods polykv polykv-static`` on the same samples, the baselines reused. Both runs
    must share the configuration and the samples, and their full-cache records must agree (same predictions and
    scores, NLL to 1e-4): the proof that the two runs are comparable."""
    cfg, ucfg = base["config"], update["config"]
    same = ("protocol", "budgets", "chat", "max_context", "model", "capture")
    differ = [k for k in same if ucfg.get(k) != cfg.get(k)]
    if differ:
        raise ValueError(f"the runs differ in {', '.join(differ)}; only runs of one configuration combine")
    full = {r["id"]: r for r in base["samples"] if r["method"] == "full"}
    ufull = {r["id"]: r for r in update["samples"] if r["method"] == "full"}
    if full.keys() != ufull.keys():
        raise ValueError(
            f"the runs evaluated different samples ({len(full)} and {len(ufull)}, {len(full.keys() ^ ufull.keys())} "
            "not in both); re-evaluate the same --data, --tasks and --limit"
        )
    for sid, r in full.items():
        u = ufull[sid]
        if (r["prediction"], r["score"]) != (u["prediction"], u["score"]) or not math.isclose(
            r["nll"], u["nll"], rel_tol=1e-4, abs_tol=1e-5
        ):
            raise ValueError(f"sample {sid!r}: the full cache gives different results in the two runs; not comparable")
    replaced = [m for m in ucfg["methods"] if m != "full"]
    methods = list(cfg["methods"]) + [m for m in replaced if m not in cfg["methods"]]
    records = [r for r in base["samples"] if r["method"] not in replaced]
    records += [r for r in update["samples"] if r["method"] in replaced]
    results = build_results(records, methods, base["single_policies"], cfg["budgets"])
    results["config"] = {**cfg, "methods": methods, "replaced_methods": replaced, "replaced_from": ucfg}
    for key in ("router", "gbdt_router"):
        if ucfg.get(key) is not None:
            results["config"][key] = ucfg[key]
    results["example_plans"] = {
        **{m: p for m, p in base.get("example_plans", {}).items() if m not in replaced},
        **{m: p for m, p in update.get("example_plans", {}).items() if m in replaced},
    }
    results["timing"] = dict(base["timing"])  # a run of every method (the update ran only some)
    return results


def _mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def _table(records: list[dict[str, Any]], key: str, methods: Sequence[str], budgets: Sequence[int], tasks: list[str]):
    """method -> str(budget) -> task -> mean of ``key``, plus "average" (mean over tasks); ``full`` is
    replicated under every budget."""
    groups: dict[tuple[str, int | None, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"], r["task"]), []).append(r[key])
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for method in methods:
        table[method] = {}
        for budget in budgets:
            b = None if method == "full" else budget
            row = {t: _mean(groups.get((method, b, t), [])) for t in tasks}
            row["average"] = _mean(row[t] for t in tasks)
            table[method][str(budget)] = row
    return table


def gap_recovery_table(
    summary: dict[str, dict[str, dict[str, float | None]]],
    singles: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method (every method that is neither ``full`` nor a single policy) and budget: its score, the best
    single policy at that budget (by score, on ``tasks``; all tasks' "average" when None; ties: the first in
    ``singles``), the full cache, and ``gap_recovery = (score - best single) / (full - best single)``, which is
    None when the full cache does not score above the best single policy (there is no gap to recover)."""

    def avg(method: str, budget: int) -> float | None:
        row = summary[method][str(budget)]
        if tasks is None:
            return row["average"]
        return _mean(row[t] for t in tasks)

    table: dict[str, dict[str, dict[str, Any]]] = {}
    present_singles = [s for s in singles if s in summary]
    targets = [m for m in summary if m != "full" and m not in singles and m != "random"]
    if not present_singles or "full" not in summary:
        return table
    for method in targets:
        table[method] = {}
        for budget in budgets:
            scored = [(avg(s, budget), s) for s in present_singles if avg(s, budget) is not None]
            best_score, best = max(scored, key=lambda x: x[0]) if scored else (None, None)  # ties: first
            learned, full = avg(method, budget), avg("full", budget)
            no_gap = full is not None and best_score is not None and full <= best_score
            table[method][str(budget)] = {
                "score": learned,
                "best_single": best,
                "best_single_score": best_score,
                "full": full,
                # undefined when the full cache does not beat the best single policy (no gap to recover)
                "gap_recovery": None if no_gap else gap_recovery(learned, best_score, full),
            }
    return table


def build_results(
    records: list[dict[str, Any]], methods: Sequence[str], singles: Sequence[str], budgets: Sequence[int]
) -> dict[str, Any]:
    tasks = sorted({r["task"] for r in records})
    test_only = [t for t in tasks if t in TEST_ONLY_TASKS]
    summary = _table(records, "score", methods, budgets, tasks)
    full_cache = dict(summary["full"][str(budgets[0])])
    scored = [t for t in tasks if (full_cache.get(t) or 0.0) >= MEANINGFUL_FULL_SCORE]
    scored_test_only = [t for t in scored if t in TEST_ONLY_TASKS]
    return {
        "tasks": tasks,
        "test_only_tasks": test_only,
        "scored_tasks": scored,
        "scored_test_only_tasks": scored_test_only,
        "meaningful_full_score": MEANINGFUL_FULL_SCORE,
        "single_policies": list(singles),
        "learned_methods": [m for m in methods if m in LEARNED_METHODS],
        "summary": summary,
        "summary_nll": _table(records, "nll", methods, budgets, tasks),
        "summary_kl": _table(records, "kl", methods, budgets, tasks),
        "full_cache": full_cache,
        "gap_recovery": gap_recovery_table(summary, singles, budgets),
        "gap_recovery_test_only": gap_recovery_table(summary, singles, budgets, test_only) if test_only else {},
        "gap_recovery_scored": gap_recovery_table(summary, singles, budgets, scored) if scored else {},
        "gap_recovery_scored_test_only": (
            gap_recovery_table(summary, singles, budgets, scored_test_only) if scored_test_only else {}
        ),
        "samples": records,
    }


# --- outputs ----------------------------------------------------------------------------------------------------
def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def results_markdown(results: dict[str, Any]) -> str:
    cfg = results.get("config", {})
    budgets = [str(b) for b in cfg.get("budgets", [])]
    methods = list(results["summary"])
    tasks = results["tasks"]
    lines = [
        f"# polykv-learn evaluation ({cfg.get('protocol', '?')})",
        "",
        f"Model `{cfg.get('model', '?')}`, data `{cfg.get('data', '?')}`, {results['timing']['samples']} samples "
        f"({results['timing']['seconds_per_sample']:.1f} s per sample), chat template: {cfg.get('chat')}.",
        "",
        "## Average score (mean over tasks) by average budget",
        "",
        *_budget_header(budgets),
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(results["summary"][m][b]["average"]) for b in budgets) + " |")
    lines += ["", "## Full-cache score per task", "", "| task | score |", "|---|---:|"]
    lines += [
        f"| {t}{' (test-only)' if t in results['test_only_tasks'] else ''} | {_fmt(results['full_cache'][t])} |"
        for t in tasks
    ]
    lines.append(f"| **average** | {_fmt(results['full_cache']['average'])} |")
    threshold = results.get("meaningful_full_score", MEANINGFUL_FULL_SCORE)
    scored, scored_test = results.get("scored_tasks", []), results.get("scored_test_only_tasks", [])
    lines += [
        "",
        f"*Scored tasks* (full cache >= {threshold:g}): {', '.join(scored) or 'none'}; test-only among them: "
        f"{', '.join(scored_test) or 'none'}.",
    ]
    sections = (
        ("scored tasks", "gap_recovery_scored"),
        ("scored test-only task types", "gap_recovery_scored_test_only"),
        ("all tasks", "gap_recovery"),
        ("test-only task types", "gap_recovery_test_only"),
    )
    for title, key in sections:
        table = results.get(key)
        if not table:
            continue
        lines += [
            "",
            f"## Gap recovery, {title}: (method - best single) / (full - best single)",
            "",
            *_budget_header(budgets),
        ]
        for m, row in table.items():
            lines.append(f"| {m} | " + " | ".join(_pct(row[b]["gap_recovery"]) for b in budgets) + " |")
        first = next(iter(table.values()))
        lines.append(
            "| *best single (score)* | "
            + " | ".join(f"{first[b]['best_single']} ({_fmt(first[b]['best_single_score'])})" for b in budgets)
            + " |"
        )
    for title, key in (("gold-answer NLL", "summary_nll"), ("KL to the full cache", "summary_kl")):
        lines += [
            "",
            f"## Mean {title} (mean over tasks)",
            "",
            *_budget_header(budgets),
        ]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(results[key][m][b]["average"]) for b in budgets) + " |")
    lines += ["", "## Score per task", ""]
    for b in budgets:
        lines += [f"### B={b}", "", "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(results["summary"][m][b][t]) for t in tasks) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _save_figure(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_score_vs_budget(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [int(b) for b in results["config"]["budgets"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, per_budget in results["summary"].items():
        ys = [per_budget[str(b)]["average"] for b in budgets]
        ys = [math.nan if y is None else y for y in ys]
        if m == "full":
            ax.axhline(ys[0], color="black", linestyle="--", label="full")
            continue
        style = "-" if m in results["learned_methods"] else ":" if m in ("pyramid", "cake") else "-."
        width = 2.5 if m in results["learned_methods"] else 1.2
        ax.plot(budgets, ys, style, marker="o", linewidth=width, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("average budget B (kept positions per KV head and layer)")
    ax.set_ylabel("score (mean over tasks)")
    ax.set_title(f"score vs budget ({results['config'].get('protocol', '')})")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)


def plot_plan_map(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = results.get("example_plans", {})
    method = next((m for m in (*LEARNED_METHODS, "cake", "pyramid") if plans.get(m)), None)
    budgets = [str(b) for b in results["config"]["budgets"]]
    rows = [b for b in budgets if method is not None and b in plans[method]]
    fig, axes = plt.subplots(
        max(len(rows), 1), 1, figsize=(9, 2.4 * max(len(rows), 1)), squeeze=False, constrained_layout=True
    )
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no compressed plan to show (contexts shorter than every budget?)", ha="center")
        axes[0, 0].set_axis_off()
    else:
        policies = sorted({p for b in rows for p in plans[method][b]["policies"]})
        colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(policies)}
        for ax, b in zip(axes[:, 0], rows, strict=True):
            plan = plans[method][b]
            layers = range(len(plan["budgets"]))
            ax.bar(layers, plan["budgets"], color=[colors[p] for p in plan["policies"]])
            ax.axhline(int(b), color="black", linewidth=0.8, linestyle="--")
            ax.set_ylabel("budget")
            ax.set_title(f"{method}, B={b}: sample {plan['sample']} (n={plan['context_tokens']})", fontsize=9)
        axes[-1, 0].set_xlabel("layer")
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in policies]
        fig.legend(handles, policies, fontsize=8, ncol=min(len(policies), 7), loc="outside upper center")
    _save_figure(fig, path)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """``results.json``, ``results.md``, ``score_vs_budget.png`` and ``plan_map.png`` in ``out_dir`` (each
    written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", [json.dumps(_finite(results), indent=1, ensure_ascii=False), "\n"])
    atomic_write_text(out / "results.md", [results_markdown(results)])
    plot_score_vs_budget(results, out / "score_vs_budget.png")
    plot_plan_map(results, out / "plan_map.png")
    return out


def _budget_header(budgets) -> list[str]:
    """Header rows of a Markdown table with one column per budget."""
    return ["| method | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
