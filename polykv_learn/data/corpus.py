"""Training corpus: (context, probe) samples for the simulator, and the document-level split.

A sample is ``{"id", "doc_id", "doc_ids", "source", "kind", "context", "probe", "context_tokens"}``.
``context + probe`` is what the model reads; only the probe's next-token distributions enter the loss.

* ``kind == "continuation"``: the documents of one source are read as one stream in their given order
  (paragraph break between documents); each sample is a contiguous chunk of ``context_tokens`` tokens
  (target drawn uniformly per sample) and the probe is the next ``probe_tokens`` tokens (about: cut at word
  boundaries). Consecutive samples do not overlap. ``context + probe`` is an exact substring of the stream.
* ``kind == "qa"``: for a document with QA pairs, its text is placed at a random position among distractor
  documents of the same source (none for ``synthetic`` documents, whose length is already in range) and the
  probe is ``"\\n\\nQuestion: <q>\\nAnswer: <a>"`` for one of its QA pairs.

``doc_id`` is the document the probe (or question) is about; ``doc_ids`` lists every document the sample
touches. Build the corpus of each split from that split's documents only (``prepare`` does) so that no
document crosses splits; ``split_by_document`` enforces it for samples built otherwise.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from polykv_learn.data.sources import Document, LengthFn, approx_tokens

__all__ = [
    "DEFAULT_FRACTIONS",
    "UNPACKED_SOURCES",
    "approx_tokens",
    "build_corpus",
    "document_split",
    "split_by_document",
]

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}
UNPACKED_SOURCES = frozenset({"synthetic"})
"""Sources whose QA documents are used alone (a distractor would add a second, conflicting needle)."""

_WORD = re.compile(r"\S+\s*")


def document_split(doc_id: str, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0) -> str:
    """The split of a document: a stable hash of ``(seed, doc_id)`` mapped to ``[0, 1)`` and cut by the
    cumulative ``fractions`` (in their given order). Independent of the other documents and of the process."""
    if not fractions or any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {dict(fractions)}")
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    acc = 0.0
    for name, frac in fractions.items():
        acc += frac
        if u < acc:
            return name
    return list(fractions)[-1]


def split_by_document(
    samples: Iterable[dict[str, Any]], fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Group samples by the split of their ``doc_id`` (see ``document_split``). A sample whose other
    documents (``doc_ids``) belong to another split is dropped, so no document lands in two splits."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in fractions}
    for sample in samples:
        split = document_split(sample["doc_id"], fractions, seed)
        if all(document_split(d, fractions, seed) == split for d in sample.get("doc_ids", ())):
            out[split].append(sample)
    return out


def _fit_words(
    text: str, offsets: Sequence[int], start: int, target: int, ratio: float, length_fn: LengthFn
) -> tuple[int, int]:
    """Number of words ``k`` from word ``start`` whose text has about ``target`` tokens, and that count.

    ``ratio`` (tokens per word) gives the first guess; each try rescales by the measured length."""
    available = len(offsets) - 1 - start
    k = max(1, min(available, round(target / ratio)))
    n = 0
    for _ in range(4):
        n = length_fn(text[offsets[start] : offsets[start + k]].rstrip())
        if abs(n - target) <= 0.03 * target or (n < target and k == available):
            break
        k = max(1, min(available, round(k * target / max(n, 1))))
    return k, n


def _continuation_samples(
    docs: Sequence[Document],
    length_fn: LengthFn,
    context_tokens: tuple[int, int],
    probe_tokens: int,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """Non-overlapping (context, continuation) samples over the stream of one source's documents."""
    lo, hi = context_tokens
    pieces = [_render(d) for d in docs]
    text = "\n\n".join(pieces)
    offsets = [m.start() for m in _WORD.finditer(text)] + [len(text)]
    bounds, pos = [], 0  # character offset where each document starts
    for piece in pieces:
        bounds.append(pos)
        pos += len(piece) + 2
    if len(offsets) < 2:
        return []
    sample_words = min(len(offsets) - 1, 4000)
    ratio = max(length_fn(text[: offsets[sample_words]]) / sample_words, 1e-3)
    samples, start = [], 0
    while start < len(offsets) - 1:
        target = rng.randint(lo, hi)
        k, n = _fit_words(text, offsets, start, target, ratio, length_fn)
        probe_k = max(1, round(probe_tokens / max(n / k, 1e-3)))
        end = start + k + probe_k
        if end > len(offsets) - 1:
            break
        if lo <= n <= hi:
            ctx_begin, ctx_end = offsets[start], offsets[start + k]
            context = text[ctx_begin:ctx_end].rstrip()
            probe = text[ctx_begin + len(context) : offsets[end]].rstrip()
            first, last = _doc_at(bounds, ctx_begin), _doc_at(bounds, offsets[end] - 1)
            probe_doc = _doc_at(bounds, ctx_end)
            samples.append(
                {
                    "doc_id": docs[probe_doc].doc_id,
                    "doc_ids": [d.doc_id for d in docs[first : last + 1]],
                    "source": docs[probe_doc].source,
                    "kind": "continuation",
                    "context": context,
                    "probe": probe,
                    "context_tokens": n,
                }
            )
        start = end
    return samples


def _doc_at(bounds: Sequence[int], char: int) -> int:
    """Index of the document containing character offset ``char`` of the stream."""
    lo, hi = 0, len(bounds) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bounds[mid] <= char:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _render(doc: Document) -> str:
    """The text of a document as it appears in the corpus (a labelled document shows its label)."""
    if doc.label:
        return f"{doc.text}\n{doc.meta.get('label_name', 'Label')}: {doc.label}"
    return doc.text


def _qa_samples(
    docs: Sequence[Document],
    length_fn: LengthFn,
    context_tokens: tuple[int, int],
    rng: random.Random,
) -> list[dict[str, Any]]:
    """One QA sample per document with QA pairs, packed with same-source distractors into the range."""
    lo, hi = context_tokens
    lengths = {d.doc_id: length_fn(d.text) for d in docs}
    samples = []
    for doc in docs:
        qa = rng.choice(doc.qa)
        parts = [doc]
        if doc.source not in UNPACKED_SOURCES:
            target = rng.randint(max(lo, lengths[doc.doc_id]), hi)
            pool = [d for d in docs if d.doc_id != doc.doc_id]
            total = lengths[doc.doc_id]
            for other in rng.sample(pool, min(len(pool), 64)):
                if total >= target:
                    break
                if total + lengths[other.doc_id] + 2 <= 0.98 * hi:  # may pass the target, not the range
                    parts.insert(rng.randint(0, len(parts)), other)
                    total += lengths[other.doc_id] + 2
        context = "\n\n".join(d.text for d in parts)
        n = length_fn(context)
        if not lo <= n <= hi:
            continue
        samples.append(
            {
                "doc_id": doc.doc_id,
                "doc_ids": [d.doc_id for d in parts],
                "source": doc.source,
                "kind": "qa",
                "context": context,
                "probe": f"\n\nQuestion: {qa.question}\nAnswer: {qa.answers[0]}",
                "context_tokens": n,
            }
        )
    return samples


def build_corpus(
    documents: Iterable[Document],
    length_fn: LengthFn = approx_tokens,
    context_tokens: tuple[int, int] = (512, 4096),
    probe_tokens: int = 32,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Training samples from ``documents`` (see the module docstring), grouped by source in first-seen order.

    Documents with QA pairs give ``qa`` samples, the others ``continuation`` samples. Contexts measure
    between ``context_tokens[0]`` and ``context_tokens[1]`` tokens under ``length_fn``; candidates that miss
    the range are dropped. Deterministic for a given input order and ``seed``; ids are ``<source>-<n>``."""
    lo, hi = context_tokens
    if not 0 < lo <= hi or probe_tokens <= 0:
        raise ValueError(
            f"need 0 < context_tokens[0] <= context_tokens[1] and probe_tokens > 0, "
            f"got {context_tokens}, {probe_tokens}"
        )
    by_source: dict[str, list[Document]] = {}
    for doc in documents:
        by_source.setdefault(doc.source, []).append(doc)
    samples: list[dict[str, Any]] = []
    for source, docs in by_source.items():
        rng = random.Random(f"corpus:{seed}:{source}")
        qa_docs = [d for d in docs if d.qa]
        text_docs = [d for d in docs if not d.qa]
        found = _continuation_samples(text_docs, length_fn, context_tokens, probe_tokens, rng)
        found += _qa_samples(qa_docs, length_fn, context_tokens, rng)
        samples += [{"id": f"{source}-{i:05d}", **s} for i, s in enumerate(found)]
    return samples
