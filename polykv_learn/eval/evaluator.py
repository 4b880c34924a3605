"""One sample at a time: every method and budget through real compressed caches (:class:`Evaluator`).

Per sample (design §4, §7):

1. **One full prefill**, shared by every method and budget: the compressed prompt runs once through the model
   with a capture-only :class:`~polykv_learn.cache.CompressedCache` (full K/V plus every layer's scoring
   statistics). Eviction happens after the prefill, so this is exact: a method's compressed cache is what its
   own prefill would have produced.
2. For each method and budget, a **fork** of that cache whose layers reference the same K/V tensors is
   compressed with the method's plan (:meth:`CompressedCache.compress`). Eviction *gathers* the kept positions
   into new tensors, which the batch below copies into its own buffers, so the shared prefill is never written;
   :meth:`Evaluator.evaluate_sample` checks this on every sample through the tensors' version counters (any
   in-place write bumps them) and raises if it ever happens. Plans that keep the same positions (e.g. every
   layer's budget >= the context) are run once.
   The ``oracle`` method alone also gets the gold answer: the shared prefill as a simulator
   :class:`~polykv_learn.simulator.ContextCapture` (views, nothing copied) with the tail and the gold answer as
   the probe (:class:`~polykv_learn.eval.methods.GoldProbe`); its plan search adds fields to its records.
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
:func:`prompt_pieces` tokenises without a model, so ``evaluate`` checks every sample's length against the model's
positions before loading it (:func:`~polykv_learn.eval.checks.fit_contexts`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache, cache_bytes
from polykv_learn.capture import CaptureOptions
from polykv_learn.data.layout import prompt_layout
from polykv_learn.eval.fork_batch import ForkBatchCache, fork_of
from polykv_learn.eval.methods import GoldProbe, Method, MethodInput
from polykv_learn.eval.metrics import answer_settled, score
from polykv_learn.eval.retention import needle_positions, plan_retention
from polykv_learn.plan import Plan
from polykv_learn.simulator import ContextCapture, Simulator, kl_to_full
from polykv_learn.text import cut_middle, lead_before

__all__ = [
    "DEFAULT_BUDGETS",
    "EncodedSample",
    "EvalSettings",
    "Evaluator",
    "PromptPieces",
    "SampleResult",
    "prompt_pieces",
]

DEFAULT_BUDGETS: tuple[int, ...] = (128, 256, 512, 1024)


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


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@dataclass(frozen=True)
class PromptPieces:
    """A sample's token ids, split where the compression happens (see the module docstring's *Prompt*)."""

    prompt: list[int]  # what is prefilled and compressed
    tail: list[int]  # fed after the compression, before the answer
    answer: list[int]  # the first gold answer (teacher-forced)
    context_tokens: int  # tokens of the context (after the max_context cut)
    cut_tokens: int  # tokens removed from the middle of the context by max_context
    max_new_tokens: int

    @property
    def positions(self) -> int:
        """Positions the evaluation uses: prompt, tail and answer room (the longer of the gold answer and
        ``max_new_tokens``)."""
        return len(self.prompt) + len(self.tail) + max(len(self.answer), self.max_new_tokens)


def prompt_pieces(tokenizer: PreTrainedTokenizerBase, settings: EvalSettings, sample: dict[str, Any]) -> PromptPieces:
    """Tokenise one sample for ``settings`` (protocol, chat template, ``max_context`` cut); needs no model."""

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    chat = None
    if settings.chat:

        def chat(user: str) -> str:
            messages = [{"role": "user", "content": user}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    layout = prompt_layout(sample, chat)
    ctx, cut = cut_middle(tok(layout.context), settings.max_context)
    # an empty question (e.g. code completion): the answer directly continues the context
    head, q, foot = tok(layout.header), tok(layout.question), tok(layout.footer)
    head = lead_before(tokenizer, head or ctx) + head  # e.g. Gemma3's BOS, once, as the model was trained
    prompt, tail = (head + ctx + q, foot) if settings.query_aware else (head + ctx, q + foot)
    if not prompt or not tail:
        raise ValueError(f"sample {sample.get('id')!r}: the prompt and what follows it must both be non-empty")
    answer = tok(layout.answer)
    if not answer:
        raise ValueError(f"sample {sample.get('id')!r}: the first gold answer is empty")
    return PromptPieces(prompt, tail, answer, len(ctx), cut, int(sample["max_new_tokens"]))


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
        # the oracle's plan search scores plans on the shared prefill through the simulator
        self.simulator = Simulator(model, self.capture) if any(m.kind == "oracle" for m in methods) else None

    # --- prompt ---------------------------------------------------------------------------------------------------
    def encode(self, sample: dict[str, Any]) -> EncodedSample:
        pieces = prompt_pieces(self.tokenizer, self.settings, sample)

        def as_ids(ids: list[int]) -> Tensor:
            return torch.tensor([ids], dtype=torch.long, device=self.model.device)

        return EncodedSample(
            as_ids(pieces.prompt), as_ids(pieces.tail), as_ids(pieces.answer), pieces.context_tokens, pieces.cut_tokens
        )

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
        kept = [p.kept_per_head(n) if p is not None else float(n) for p in plans]
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

    def _gold_probe(self, shared: CompressedCache, last_logits: Tensor, enc: EncodedSample) -> GoldProbe:
        """The oracle's probe on the shared prefill: its K/V and statistics (nothing copied), the tail then the
        gold answer."""
        capture = ContextCapture(
            keys=[layer.keys[0] for layer in shared.layers],  # (G, n, d) views of the shared prefill
            values=[layer.values[0] for layer in shared.layers],
            stats=shared.layer_stats,
            last_logits=last_logits.float(),  # (V,)
            _ranks={},
        )
        probe = torch.cat([enc.tail_ids, enc.answer_ids], dim=1)  # (1, m + a)
        return GoldProbe(self.simulator, capture, probe, enc.tail_ids.shape[1])

    # --- one sample ---------------------------------------------------------------------------------------------
    @staticmethod
    def _plan_key(plan: Plan | None, n: int) -> tuple | None:
        """Identifies what a plan keeps for a context of ``n``: None when it keeps everything."""
        if plan is None or plan.keeps_all(n):
            return None
        key = []
        for i, (p, b) in enumerate(plan):
            if plan.keeps_all(n, layer=i):
                key.append(("*", n))
            else:  # head budgets above n keep n
                key.append((p, b) if plan.head_budgets is None else (p, tuple(min(h, n) for h in plan.head_budgets[i])))
        return tuple(key)

    @torch.no_grad()
    def evaluate_sample(self, sample: dict[str, Any]) -> SampleResult:
        start = time.perf_counter()
        enc = self.encode(sample)
        n = enc.prompt_ids.shape[1]
        shared = CompressedCache(self.model, capture=self.capture)
        out = adapter.forward(self.model, enc.prompt_ids, shared, logits_to_keep=1)
        gold = None if self.simulator is None else self._gold_probe(shared, out.logits[0, -1], enc)
        inp = MethodInput(shared.layer_stats, gold)
        del out
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
        todo = sorted(((k, p) for k, p in jobs.items() if k is not None), key=lambda kp: kp[1].kept_per_head(n))
        size = self.settings.batch_size
        for i in range(0, len(todo), size):
            chunk = todo[i : i + size]
            rows, _ = self._run(shared, [p for _, p in chunk], enc, max_new, full_logits, metric, answers)
            by_key.update({k: r for (k, _), r in zip(chunk, rows, strict=True)})
        after = [(layer.keys._version, layer.values._version) for layer in shared.layers]
        if after != versions:
            raise RuntimeError("evaluating the methods wrote into the shared prefill; results would be invalid")

        metric_kw = {"all_classes": sample.get("all_classes")}
        # the gold answer's tokens in the context (none: the sample has no needle and no retention)
        needle = needle_positions(self.tokenizer, sample, self.settings.chat, self.settings.max_context)
        base = {"id": sample["id"], "task": sample["task"], "context_tokens": n, "needle_tokens": len(needle)}

        def record(method: str, budget: int | None, row: _RowResult, plan: Plan | None = None) -> dict[str, Any]:
            layers = plan_retention(plan, inp.stats, needle) if needle else None
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
                "needle_retention": None if layers is None else sum(layers) / len(layers),
                "needle_retention_layers": layers,
            }

        records = [record("full", None, full_rows[0])]
        for method in self.methods[1:]:
            for budget in self.settings.budgets:
                plan = plans[method.name][budget]
                row = by_key[self._plan_key(plan, n)]
                records.append({**record(method.name, budget, row, plan), **method.extras(inp, budget)})
        return SampleResult(records, plans, n, time.perf_counter() - start)
