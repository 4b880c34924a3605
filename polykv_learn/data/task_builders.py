"""The record builders of the evaluation tasks (:mod:`polykv_learn.data.tasks`): each task's instruction
(``TASK_INTROS``) and a builder per task that draws one record's context, question and answers from its documents
or a generated haystack (``_BUILDERS``), with what its key documents must carry (``_NEEDS``).

A builder gets a :class:`_Env` (the split's rng, token range, key and filler documents) and returns a
:class:`_Draft`, or None when its documents cannot make a record; :func:`polykv_learn.data.tasks.build_tasks` adds
the common fields, checks the length and assembles the records. Needle tasks are built by
:mod:`polykv_learn.data.haystack` from the haystack families and needle templates of the record's split.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polykv_learn.data import haystack
from polykv_learn.data.corpus import DEFAULT_FRACTIONS, document_split
from polykv_learn.data.sources import Document, LengthFn
from polykv_learn.data.synthetic import sized_synthetic

__all__ = ["TASK_INTROS"]

_QA_INSTRUCTION = "Answer the question based on the passages above. Only give the answer, no other words."

#: LongBench/RULER-style task instructions that open each context. They say what kind of question will come, never
#: the question itself, so the query-agnostic protocol stays query-agnostic. SmolLM2-135M needs them: without the
#: opening line its pass-key retrieval at 1.7K tokens fell from 6/6 to 1/6 (measured, plain prompt).
TASK_INTROS: dict[str, str] = {
    "single_doc_qa": "Answer the question based on the given passages. Only give me the answer and do not output any"
    " other words. The following are given passages.",
    "multi_doc_qa": "Answer the question based on the given numbered passages. Only give me the answer and do not"
    " output any other words. The following are given passages.",
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will"
    " quiz you about the important information there.",
    "multi_key_needle": "Some special magic numbers are hidden inside the following text. Make sure to memorize them."
    " I will quiz you about the numbers afterwards.",
    "multi_query_needle": "Some special magic numbers are hidden inside the following text. Make sure to memorize"
    " them. I will quiz you about the numbers afterwards.",
    "multi_value_needle": "Some special values are hidden inside the following text, several of them for the same"
    " name. Make sure to memorize them. I will quiz you about them afterwards.",
    "kv_lookup": "Below is a JSON object of key-value pairs. Memorize it. I will ask you for the value of one key"
    " afterwards.",
    "variable_tracking": "Memorize and track the chains of variable assignments hidden in the following text. I will"
    " ask you which variables hold a value afterwards.",
    "few_shot_classification": "Classify the intent of each utterance. Here are some examples.",
    "code_completion": "Please complete the code given below.",
    "summarisation": "You are given several news articles. Afterwards you will be asked to summarize one of them in"
    " one sentence.",
    "book_qa": "Read the following chapter of a novel carefully. Afterwards you will be asked to recall one of its"
    " sentences exactly.",
}


@dataclass
class _Draft:
    """A record before the common fields are filled in."""

    context: str
    question: str
    answers: list[str]
    doc_ids: list[str]
    all_classes: list[str] | None = None
    answer_prefix: str | None = None  # None: the task's default (TaskSpec.answer_prefix)
    extra: dict[str, Any] | None = None  # fields the record also carries (needle tasks: haystack, template, ...)


class _Env:
    """What a builder needs: rng, token range and target, documents (key pool and filler pool)."""

    def __init__(
        self,
        rng: random.Random,
        length_fn: LengthFn,
        lo: int,
        hi: int,
        keys: Sequence[Document],
        fillers: Sequence[Document],
        seed: str,
        split: str = "train",
        documents_by_source: Mapping[str, Sequence[Document]] | None = None,
        fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
        split_seed: int = 0,
    ) -> None:
        self.rng, self.length_fn, self.lo, self.hi = rng, length_fn, lo, hi
        self.keys, self.fillers, self.seed = keys, fillers, seed
        self.split, self.made = split, 0
        self.documents_by_source = documents_by_source or {}
        self.fractions, self.split_seed = fractions, split_seed
        self._lengths: dict[tuple[str, str | None], int] = {}

    def tokens(self, doc: Document, text: str | None = None) -> int:
        """Token length of a document's text (memoised), or of ``text`` rendered from it."""
        key = (doc.doc_id, text)
        if key not in self._lengths:
            self._lengths[key] = self.length_fn(doc.text if text is None else text)
        return self._lengths[key]

    def target(self) -> int:
        return self.rng.randint(self.lo, self.hi)

    def pack(self, key: Document, render: Callable[[Document], str], target: int) -> list[Document]:
        """``key`` plus random distinct fillers until the rendered length reaches ``target`` (without passing
        98% of the range's upper end), shuffled."""
        parts, total = [key], self.tokens(key, render(key)) + 2
        pool = [d for d in self.fillers if d.doc_id != key.doc_id]
        for other in self.rng.sample(pool, min(len(pool), 400)):
            if total >= target:
                break
            n = self.tokens(other, render(other)) + 2
            if total + n <= 0.98 * self.hi:
                parts.append(other)
                total += n
        self.rng.shuffle(parts)
        return parts


# ----------------------------------------------------------------------------------------------- builders


def _ids(key: Document, parts: Sequence[Document]) -> list[str]:
    """Document ids of a record, key document first."""
    return [key.doc_id] + [d.doc_id for d in parts if d.doc_id != key.doc_id]


def _single_doc_qa(env: _Env) -> _Draft | None:
    key = env.rng.choice(env.keys)
    qa = env.rng.choice(key.qa)
    parts = env.pack(key, lambda d: d.text, env.target())
    context = "\n\n".join(d.text for d in parts)
    question = f"{_QA_INSTRUCTION}\n\nQuestion: {qa.question}"
    return _Draft(context, question, list(qa.answers), _ids(key, parts))


def _multi_doc_qa(env: _Env) -> _Draft | None:
    key = env.rng.choice(env.keys)
    qa = env.rng.choice(key.qa)
    parts = env.pack(key, lambda d: f"Passage 00:\n{d.text}", env.target())
    context = "\n\n".join(f"Passage {i + 1}:\n{d.text}" for i, d in enumerate(parts))
    j = parts.index(key) + 1
    question = (
        f"Answer the question using only Passage {j}. Only give the answer, no other words.\n\nQuestion: {qa.question}"
    )
    return _Draft(context, question, list(qa.answers), _ids(key, parts))


def _summarisation(env: _Env) -> _Draft | None:
    key = env.rng.choice(env.keys)
    parts = env.pack(key, lambda d: f"Article 00:\n{d.text}", env.target())
    context = "\n\n".join(f"Article {i + 1}:\n{d.text}" for i, d in enumerate(parts))
    j = parts.index(key) + 1
    question = f"Write a one-sentence summary of Article {j}."
    return _Draft(context, question, [key.summary], _ids(key, parts))


def _demo(doc: Document) -> str:
    return f"Utterance: {doc.text}\nIntent: {doc.label}"


def _few_shot_classification(env: _Env) -> _Draft | None:
    key = env.rng.choice(env.keys)
    classes = sorted(
        {c for d in env.fillers for c in d.meta.get("classes", "").split(",") if c}
        | {d.label for d in env.fillers}
        | {key.label}
    )
    target, pool = env.target(), [d for d in env.fillers if d.text != key.text]
    demos: list[Document] = []
    order: list[Document] = []
    total = 0
    while pool and total < target * 0.97:  # demonstrations repeat (reshuffled) once the pool is used up
        if not order:
            order = env.rng.sample(pool, len(pool))
        demo = order.pop()
        n = env.tokens(demo, _demo(demo)) + 2
        if total + n > target:
            break
        demos.append(demo)
        total += n
    context = "\n\n".join(_demo(d) for d in demos)
    question = (
        f"Determine the intent of the utterance below; the possible intents are: {', '.join(classes)}."
        f"\n\nUtterance: {key.text}"
    )
    return _Draft(context, question, [key.label], [key.doc_id] + sorted({d.doc_id for d in demos}), classes)


_MEANINGFUL = re.compile(r"[A-Za-z_]")


def _code_completion(env: _Env) -> _Draft | None:
    key = env.rng.choice(env.keys)
    lines = key.text.split("\n")
    per_char = env.tokens(key) / max(len(key.text), 1)
    target = env.target()
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    min_chars = env.lo / per_char
    candidates = [
        k
        for k, line in enumerate(lines)
        if starts[k] >= min_chars
        and len(line.strip()) >= 8
        and _MEANINGFUL.search(line)
        and not line.strip().startswith(("#", '"""', "'''"))
    ]
    if not candidates:
        return None
    k = env.rng.choice(candidates)
    s = 0
    for _ in range(4):  # first line s such that lines[s:k] holds about `target` tokens
        want = target / per_char
        s = bisect.bisect_left(starts, starts[k] - want, 0, k)
        s = min(s, k - 1)
        n = env.length_fn("\n".join(lines[s:k]))
        if abs(n - target) <= 0.03 * target or s == 0:
            break
        per_char = n / max(starts[k] - starts[s], 1)
    # no question: like LongBench's lcc, the model simply continues the code on the next line
    return _Draft("\n".join(lines[s:k]), "", [lines[k].strip()], [key.doc_id])


_SENTENCE_END = re.compile(
    r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?:(?<=[.!?])|(?<=[.!?][\"']))\s+"
    r"(?=[\"'A-Z])"
)


def _book_qa(env: _Env) -> _Draft | None:
    key = env.rng.choice(env.keys)
    paras = key.text.split("\n\n")
    per_char = env.tokens(key) / max(len(key.text), 1)
    want = env.target() / per_char
    remaining = [0] * (len(paras) + 1)  # characters from paragraph i to the end
    for i in range(len(paras) - 1, -1, -1):
        remaining[i] = remaining[i + 1] + len(paras[i]) + 2
    starts = [i for i in range(len(paras)) if remaining[i] >= want] or [0]
    chosen: list[str] = []
    size = 0
    for para in paras[env.rng.choice(starts) :]:
        if size + len(para) > want and chosen:
            break
        chosen.append(para)
        size += len(para) + 2
    context = "\n\n".join(chosen)
    sentences = [s for para in chosen for s in _SENTENCE_END.split(para)]
    pairs = [
        (a, b)
        for a, b in zip(sentences, sentences[1:], strict=False)
        if len(a.split()) >= 6 and 4 <= len(b.split()) <= 50 and context.count(a) == 1 and b in context
    ]
    if not pairs:
        return None
    before, after = env.rng.choice(pairs)
    question = (
        f'In the text above, which sentence comes right after this one: "{before}" Copy that next sentence exactly.'
    )
    return _Draft(context, question, [after], [key.doc_id])


def _family_pool(env: _Env, family: haystack.HaystackFamily) -> list[Document]:
    """Documents of ``family`` a record of ``env.split`` may use: a training family's documents of that split
    (by ``document_split``), every document of a held-out family."""
    docs = haystack.family_documents(family, env.documents_by_source)
    if family.split != "train":
        return docs
    want = "train" if env.split == "train" else env.split
    return [d for d in docs if document_split(d.doc_id, env.fractions, env.split_seed) == want]


def _needle(kind: str) -> Callable[[_Env], _Draft | None]:
    def build(env: _Env) -> _Draft | None:
        held_out = env.split == "validation" or (env.split == "test" and env.made % 2 == 0)
        families = [f for f in haystack.families_for(env.split, held_out) if not f.sources or _family_pool(env, f)]
        templates = haystack.templates_for(kind, env.split, held_out)
        if not families or not templates:
            return None
        family, template = env.rng.choice(families), env.rng.choice(templates)
        # aim inside the range (a haystack ends at a whole sentence or line), leaving room for the instruction
        target = min(max(env.target(), round(env.lo * 1.06)), round(env.hi * 0.94))
        target -= env.length_fn(TASK_INTROS[kind])
        sample = haystack.make_needle_sample(
            kind, env.rng, family, template, _family_pool(env, family), env.length_fn, target
        )
        heldout_sources = family.split != "train" and (kind == "variable_tracking" or template.split != "train")
        extra = {
            "haystack": sample.family,
            "template": sample.template,
            "value_kind": sample.value_kind,
            "heldout_sources": heldout_sources,
        }
        return _Draft(sample.context, sample.question, sample.answers, sample.doc_ids, None, sample.prefix, extra)

    return build


def _synthetic(kind: str) -> Callable[[_Env], _Draft | None]:
    def build(env: _Env) -> _Draft | None:
        target = min(max(env.target(), round(env.lo * 1.06)), round(env.hi * 0.94))
        text, qa, _ = sized_synthetic(kind, f"{env.seed}:{env.rng.random()}", env.length_fn, target)
        return _Draft(text, qa.question, list(qa.answers), [], answer_prefix=qa.prefix or None)

    return build


_BUILDERS: dict[str, Callable[[_Env], _Draft | None]] = {
    "single_doc_qa": _single_doc_qa,
    "multi_doc_qa": _multi_doc_qa,
    "passkey": _needle("passkey"),
    "multi_key_needle": _needle("multi_key_needle"),
    "multi_value_needle": _needle("multi_value_needle"),
    "kv_lookup": _synthetic("kv_lookup"),
    "variable_tracking": _needle("variable_tracking"),
    "multi_query_needle": _needle("multi_query_needle"),
    "few_shot_classification": _few_shot_classification,
    "code_completion": _code_completion,
    "summarisation": _summarisation,
    "book_qa": _book_qa,
}
_NEEDS = {
    "single_doc_qa": "qa",
    "multi_doc_qa": "qa",
    "summarisation": "summary",
    "few_shot_classification": "label",
}
