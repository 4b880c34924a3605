"""Offline LongBench-style evaluation tasks built from the raw sources, as records of the user JSONL schema.

=========================  ===========  ==============  ======================================================
task                       source       metric          what is asked
=========================  ===========  ==============  ======================================================
``single_doc_qa``          quoref       qa_f1           a Wikipedia passage's question; the passage sits
                                                        among distractor passages
``multi_doc_qa``           quoref       qa_f1           numbered passages; the question names the passage
``passkey``                haystack     string_match    one needle (a pass key, a code, ...) hidden in natural
                                                        text or code (``polykv_learn.data.haystack``)
``multi_key_needle``       haystack     string_match    one of four keyed needles
``multi_value_needle``     haystack     string_match    all three values of one key, among keyed distractors
                                                        (score = share of them found)
``multi_query_needle``     haystack     string_match    two of four keyed needles at once (share found)
``kv_lookup``              synthetic    string_match    the value of one UUID key in a JSON object
``variable_tracking``      haystack     string_match    all variables bound to a value through chains
                                                        ``VAR B = VAR A`` (score = share of them found)
``few_shot_classification`` snips       classification  the intent of an utterance after many labelled ones
``code_completion``        python       code_sim        the next line of a Python file prefix (no question:
                                                        the model continues the code, like LongBench's lcc)
``summarisation``          xsum         rouge_l         a one-sentence summary of one of several articles
``book_qa``                austen       qa_f1           the sentence that follows a quoted one in a chapter
=========================  ===========  ==============  ======================================================

Every context opens with the task's instruction (``TASK_INTROS``, LongBench/RULER style: what kind of question
will come, never the question). Needle tasks carry an answer prefix that restates the question (RULER style,
e.g. ``The special magic number for amber-falcon mentioned in the text is``), and their records say which haystack
family (``haystack``), needle template (``template``) and value kind (``value_kind``) they use.

Held out: ``TEST_ONLY_TASKS`` (``variable_tracking``, ``code_completion``, ``multi_query_needle``) get only
``test`` records, and neither they nor their only source (Python code: ``TEST_ONLY_SOURCES``; the two-key
question) appear in the training corpus, so they measure generalisation to unseen task types and an unseen
domain. (``multi_query_needle`` reuses the multi-key haystack, which is trained on; its question is new.)

Held-out sources: the haystack families and needle templates of ``polykv_learn.data.haystack`` belong to one split
each. ``train`` needle records use training families and templates; ``validation`` needle records (for model
selection) the validation family and templates only; half of the ``test`` needle records a test family and a test
template, the other half training families' test documents and training templates. ``heldout_sources`` is true on
a record whose source family and template training never saw (those test needle records, and code completion,
whose Python source is test-only); ``prepare-data`` writes them to ``tasks/heldout.jsonl`` as well.
``HELD_OUT_SOURCES`` (the sources of non-training families) never enter the training corpus.

Splits: the *key document* of a record (the QA passage, query utterance, summarised article, chapter, code
file) decides its split: ``test`` when ``document_split(doc_id, fractions, seed) == "test"``, else ``train``.
``train`` records use only non-test documents; ``test`` records may draw distractors and demonstrations from
every document of the source (they are never trained on as a key). Synthetic records are generated with a
seed per split. Test-only tasks use every document of their source.

A model reads ``context``, then ``question``, then ``answer_prefix`` (e.g. ``f"{context}\\n\\n{question}\\n
{answer_prefix}"``). With ``chat=True`` the ``answer_prefix`` is left empty (the chat template opens the
assistant turn); the instructions are the same in both modes.

The instructions and the builder of each task's records are in :mod:`polykv_learn.data.task_builders`; this module
holds the task specs and assembles the records (:func:`build_tasks`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polykv_learn.data import haystack
from polykv_learn.data.corpus import DEFAULT_FRACTIONS, document_split
from polykv_learn.data.jsonl import write_jsonl
from polykv_learn.data.sources import Document, LengthFn, approx_tokens
from polykv_learn.data.task_builders import _BUILDERS, _NEEDS, TASK_INTROS, _Env

__all__ = [
    "HELD_OUT_SOURCES",
    "NEEDLE_TASKS",
    "TASKS",
    "TASK_INTROS",
    "TASK_SPECS",
    "TEST_ONLY_SOURCES",
    "TEST_ONLY_TASKS",
    "TaskSpec",
    "build_tasks",
    "write_jsonl",
]


@dataclass(frozen=True)
class TaskSpec:
    """Static facts of a task type."""

    metric: str
    max_new_tokens: int
    answer_prefix: str
    source: str  # the source of its documents ("synthetic": generated)


TASK_SPECS: dict[str, TaskSpec] = {
    "single_doc_qa": TaskSpec("qa_f1", 32, "Answer:", "quoref"),
    "multi_doc_qa": TaskSpec("qa_f1", 32, "Answer:", "quoref"),
    "passkey": TaskSpec("string_match", 16, "Answer:", "haystack"),
    "multi_key_needle": TaskSpec("string_match", 16, "Answer:", "haystack"),
    "multi_value_needle": TaskSpec("string_match", 40, "Answer:", "haystack"),
    "kv_lookup": TaskSpec("string_match", 48, "Corresponding value:", "synthetic"),
    "variable_tracking": TaskSpec("string_match", 32, "Answer:", "haystack"),
    "multi_query_needle": TaskSpec("string_match", 28, "Answer:", "haystack"),
    "few_shot_classification": TaskSpec("classification", 16, "Intent:", "snips"),
    "code_completion": TaskSpec("code_sim", 64, "", "python"),
    "summarisation": TaskSpec("rouge_l", 64, "Summary:", "xsum"),
    "book_qa": TaskSpec("qa_f1", 64, "Next sentence:", "austen"),
}
TASKS: tuple[str, ...] = tuple(TASK_SPECS)
TEST_ONLY_TASKS: tuple[str, ...] = ("variable_tracking", "code_completion", "multi_query_needle")
"""Task types held out of training: only ``test`` records, and nothing of them in the training corpus."""
TEST_ONLY_SOURCES: tuple[str, ...] = ("python",)
"""Sources used only by test-only tasks (kept out of the training corpus)."""
NEEDLE_TASKS: tuple[str, ...] = tuple(t for t, spec in TASK_SPECS.items() if spec.source == "haystack")
"""Task types built by ``polykv_learn.data.haystack`` (haystack families and needle templates split by split)."""
HELD_OUT_SOURCES: tuple[str, ...] = tuple(
    sorted({s for f in haystack.FAMILIES.values() if f.split != "train" for s in f.sources} | set(TEST_ONLY_SOURCES))
)
"""Document sources of the held-out haystack families and of the test-only tasks: never in the training corpus."""


# ----------------------------------------------------------------------------------------------- assembly


def _pools(
    task: str, split: str, docs: Sequence[Document], fractions: Mapping[str, float], seed: int
) -> tuple[list[Document], list[Document]]:
    """(key documents, filler documents) of a task's split."""
    need = _NEEDS.get(task)
    docs = sorted((d for d in docs if need is None or getattr(d, need)), key=lambda d: d.doc_id)
    if task in TEST_ONLY_TASKS:
        return docs, docs
    is_test = [document_split(d.doc_id, fractions, seed) == "test" for d in docs]
    test = [d for d, t in zip(docs, is_test, strict=True) if t]
    train = [d for d, t in zip(docs, is_test, strict=True) if not t]
    return (test, docs) if split == "test" else (train, train)


def _splits(task: str) -> tuple[str, ...]:
    """Splits a task type gets records in (needle tasks also ``validation``; test-only tasks ``test`` only)."""
    if task in TEST_ONLY_TASKS:
        return ("test",)
    return ("train", "validation", "test") if task in NEEDLE_TASKS else ("train", "test")


def build_tasks(
    documents_by_source: Mapping[str, Sequence[Document]],
    length_fn: LengthFn = approx_tokens,
    target_tokens: tuple[int, int] | Mapping[str, tuple[int, int]] = (1024, 4096),
    samples_per_task: int | Mapping[str, int] = 50,
    seed: int = 0,
    chat: bool = False,
    tasks: Sequence[str] | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    with_doc_ids: bool = False,
) -> list[dict[str, Any]]:
    """Evaluation records of every task in ``tasks`` (default ``TASKS``) for splits ``train``, ``validation`` (needle
    tasks only) and ``test`` (``test`` only for ``TEST_ONLY_TASKS``); see the module docstring.

    ``samples_per_task`` is the number of records per task and split (an int, or a mapping split -> int); so is
    ``target_tokens`` (a (lo, hi) range, or a mapping split -> range). A task whose source is missing from
    ``documents_by_source`` (or has no usable document) is skipped; a task may return fewer records when its
    documents cannot reach the token range. Every context measures within its split's range under ``length_fn``.
    ``with_doc_ids`` adds a ``doc_ids`` list (documents used, key document first; empty for generated haystacks)
    to each record. Every record has ``heldout_sources`` (see the module docstring). Deterministic for given inputs
    and ``seed``."""
    ranges = (
        {s: target_tokens for s in ("train", "validation", "test")}
        if isinstance(target_tokens, tuple)
        else target_tokens
    )
    for split, rng_ in ranges.items():
        if not (isinstance(rng_, (tuple, list)) and len(rng_) == 2 and 0 < rng_[0] <= rng_[1]):
            raise ValueError(f"need 0 < target_tokens[0] <= target_tokens[1] (split {split}), got {rng_}")
    unknown = sorted(set(tasks or ()) - set(TASK_SPECS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; allowed: {', '.join(TASKS)}")
    records: list[dict[str, Any]] = []
    for task in tasks or TASKS:
        spec = TASK_SPECS[task]
        for split in _splits(task):
            if split not in ranges:
                continue
            lo, hi = ranges[split]
            count = samples_per_task if isinstance(samples_per_task, int) else samples_per_task.get(split, 0)
            if spec.source in ("synthetic", "haystack"):
                keys: list[Document] = []
                fillers: list[Document] = []
            else:
                keys, fillers = _pools(task, split, documents_by_source.get(spec.source, ()), fractions, seed)
                if not keys:
                    continue
            rng = random.Random(f"tasks:{seed}:{task}:{split}")
            env = _Env(
                rng,
                length_fn,
                lo,
                hi,
                keys,
                fillers,
                f"{seed}:{task}:{split}",
                split,
                documents_by_source,
                fractions,
                seed,
            )
            made, attempts = 0, 0
            while made < count and attempts < 20 * count + 20:
                attempts += 1
                env.made = made
                draft = _BUILDERS[task](env)
                if draft is None:
                    continue
                context = f"{TASK_INTROS[task]}\n\n{draft.context}"
                if not lo <= length_fn(context) <= hi:
                    continue
                record = {
                    "id": f"{task}/{split}/{made:04d}",
                    "task": task,
                    "split": split,
                    "context": context,
                    "question": draft.question,
                    "answers": draft.answers,
                    "metric": spec.metric,
                    "answer_prefix": "" if chat else (draft.answer_prefix or spec.answer_prefix),
                    "max_new_tokens": spec.max_new_tokens,
                    "heldout_sources": spec.source in TEST_ONLY_SOURCES,
                }
                if draft.all_classes is not None:
                    record["all_classes"] = draft.all_classes
                record.update(draft.extra or {})
                if with_doc_ids:
                    record["doc_ids"] = draft.doc_ids
                records.append(record)
                made += 1
    return records
