"""Fetch the raw sources, build the training corpus and the evaluation tasks, and write them to disk.

Layout of ``out_dir``::

    corpus/train.jsonl  corpus/validation.jsonl  corpus/test.jsonl   training samples (see corpus.py)
    tasks/train.jsonl   tasks/validation.jsonl   tasks/test.jsonl     task records (see tasks.py)
    tasks/heldout.jsonl                                               the test records with held-out sources
    manifest.json                                                     counts per source/task/split, settings

Guarantees: every document belongs to one split (``document_split`` with the given ``seed``); the corpus of
a split is built from that split's documents only; the training corpus holds no test document, no test-only
task type (``TEST_ONLY_TASKS``) and nothing of the held-out sources (``HELD_OUT_SOURCES``: the test-only sources
and those of the validation and test haystack families). Austen novels
enter as chapters, so chapters (not novels) are the unit of the split.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from polykv_learn.data.corpus import DEFAULT_FRACTIONS, build_corpus, document_split
from polykv_learn.data.jsonl import atomic_write_text, write_jsonl
from polykv_learn.data.sources import (
    BIGBENCH_TASKS,
    Document,
    LengthFn,
    approx_tokens,
    austen_chapters,
    austen_documents,
    bigbench_documents,
    pydoc_documents,
    python_documents,
)
from polykv_learn.data.synthetic import SYNTHETIC_KINDS, synthetic_documents
from polykv_learn.data.tasks import HELD_OUT_SOURCES, TEST_ONLY_SOURCES, TEST_ONLY_TASKS, build_tasks

__all__ = ["ALL_SOURCES", "load_documents", "prepare_data"]

ALL_SOURCES: tuple[str, ...] = ("bigbench", "austen", "python")
"""Source groups ``prepare_data`` can fetch (``bigbench`` gives quoref, xsum, wikilingua and snips; ``python`` the
stdlib's source files and its reference manual, ``pydocs``)."""


def _cap(docs: list[Document], limit: int | None, seed: int) -> list[Document]:
    """At most ``limit`` documents: a seeded sample, kept in the original order."""
    if limit is None or len(docs) <= limit:
        return docs
    keep = set(random.Random(f"cap:{seed}").sample(range(len(docs)), limit))
    return [d for i, d in enumerate(docs) if i in keep]


def load_documents(
    sources: Sequence[str] = ALL_SOURCES,
    cache_dir: Path | None = None,
    max_docs_per_source: int | None = None,
    seed: int = 0,
) -> dict[str, list[Document]]:
    """Documents by source name for the requested source groups (downloads what is missing); Austen novels
    are split into chapters; ``max_docs_per_source`` keeps a seeded sample of each source."""
    unknown = sorted(set(sources) - set(ALL_SOURCES))
    if unknown:
        raise ValueError(f"unknown source groups {unknown}; allowed: {', '.join(ALL_SOURCES)}")
    out: dict[str, list[Document]] = {}
    if "bigbench" in sources:
        out.update(bigbench_documents(cache_dir=cache_dir))
    if "austen" in sources:
        out["austen"] = [ch for novel in austen_documents(cache_dir=cache_dir) for ch in austen_chapters(novel)]
    if "python" in sources:
        out["python"] = python_documents()
        out["pydocs"] = pydoc_documents()
    return {name: _cap(docs, max_docs_per_source, seed) for name, docs in out.items()}


def prepare_data(
    out_dir: str | os.PathLike[str],
    length_fn: LengthFn = approx_tokens,
    seed: int = 0,
    max_docs_per_source: int | None = None,
    *,
    sources: Sequence[str] = ALL_SOURCES,
    documents: Mapping[str, Sequence[Document]] | None = None,
    cache_dir: Path | None = None,
    context_tokens: tuple[int, int] = (512, 4096),
    target_tokens: tuple[int, int] = (1024, 4096),
    train_target_tokens: tuple[int, int] | None = (1024, 2048),
    probe_tokens: int = 32,
    samples_per_task: int | Mapping[str, int] = 50,
    synthetic_docs: int = 300,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    chat: bool = False,
) -> dict[str, Any]:
    """Build and write the corpus splits, the task files and ``manifest.json`` under ``out_dir``; return
    the manifest. ``documents`` (source -> documents) replaces fetching ``sources`` (useful offline and in
    tests). ``synthetic_docs`` generated QA documents (pass keys, multi-key needles, key-value JSON) join the
    corpus, split by the same hash as the other documents."""
    out = Path(out_dir)
    if "test" not in fractions:
        raise ValueError(f"fractions must have a 'test' split, got {dict(fractions)}")
    if documents is None:
        docs_by_source = load_documents(sources, cache_dir, max_docs_per_source, seed)
    else:
        docs_by_source = {name: _cap(list(docs), max_docs_per_source, seed) for name, docs in documents.items()}
    trainable_kinds = tuple(k for k in SYNTHETIC_KINDS if k not in TEST_ONLY_TASKS)
    synthetic = synthetic_documents(synthetic_docs, seed, trainable_kinds, length_fn, context_tokens)

    corpus_docs = [d for name, docs in docs_by_source.items() if name not in HELD_OUT_SOURCES for d in docs] + synthetic
    by_split: dict[str, list[Document]] = {name: [] for name in fractions}
    for doc in corpus_docs:
        by_split[document_split(doc.doc_id, fractions, seed)].append(doc)
    corpus_counts: dict[str, dict[str, int]] = {}
    for split, docs in by_split.items():
        samples = build_corpus(docs, length_fn, context_tokens, probe_tokens, seed)
        samples = [{**s, "id": f"{split}/{s['id']}", "split": split} for s in samples]
        write_jsonl(samples, out / "corpus" / f"{split}.jsonl")
        corpus_counts[split] = dict(sorted(Counter(s["source"] for s in samples).items()))

    fit_range = tuple(train_target_tokens or target_tokens)
    ranges = {"train": fit_range, "validation": fit_range, "test": tuple(target_tokens)}
    records = build_tasks(docs_by_source, length_fn, ranges, samples_per_task, seed, chat, fractions=fractions)
    task_counts: dict[str, dict[str, int]] = {}
    for split in ("train", "validation", "test", "heldout"):
        if split == "heldout":
            chosen = [r for r in records if r["split"] == "test" and r["heldout_sources"]]
        else:
            chosen = [r for r in records if r["split"] == split]
        write_jsonl(chosen, out / "tasks" / f"{split}.jsonl")
        task_counts[split] = dict(sorted(Counter(r["task"] for r in chosen).items()))

    doc_counts = {
        name: dict(sorted(Counter(document_split(d.doc_id, fractions, seed) for d in docs).items()))
        for name, docs in sorted({**docs_by_source, "synthetic": synthetic}.items())
    }
    manifest = {
        "seed": seed,
        "length_fn": getattr(length_fn, "__qualname__", repr(length_fn)),
        "fractions": dict(fractions),
        "context_tokens": list(context_tokens),
        "target_tokens": list(target_tokens),
        "train_target_tokens": list(fit_range),
        "probe_tokens": probe_tokens,
        "chat": chat,
        "bigbench_tasks": BIGBENCH_TASKS,
        "test_only_tasks": list(TEST_ONLY_TASKS),
        "test_only_sources": list(TEST_ONLY_SOURCES),
        "held_out_sources": list(HELD_OUT_SOURCES),
        "documents": doc_counts,
        "corpus": corpus_counts,
        "tasks": task_counts,
    }
    atomic_write_text(out / "manifest.json", [json.dumps(manifest, indent=2, sort_keys=True) + "\n"])
    return manifest
