"""Data layer: offline raw sources (``sources``), the training corpus (``corpus``), LongBench-style evaluation
tasks (``tasks``) and the one-call preparation of all of them (``prepare``)."""

from polykv_learn.data.corpus import build_corpus, document_split, split_by_document
from polykv_learn.data.prepare import prepare_data
from polykv_learn.data.sources import Document, QAPair, approx_tokens
from polykv_learn.data.tasks import TASKS, TEST_ONLY_TASKS, build_tasks

__all__ = [
    "TASKS",
    "TEST_ONLY_TASKS",
    "Document",
    "QAPair",
    "approx_tokens",
    "build_corpus",
    "build_tasks",
    "document_split",
    "prepare_data",
    "split_by_document",
]
