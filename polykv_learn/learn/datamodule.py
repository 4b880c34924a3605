"""``PrefillDataModule``: the training corpus (Hugging Face ``datasets``) and its cached context prefills.

Reads ``<data_dir>/corpus/{train,validation}.jsonl`` (written by ``polykv-learn prepare-data``; one sample per line
with ``id``, ``context`` and ``probe`` text), tokenizes with the model's tokenizer, and in ``prepare_data`` builds
the prefill cache (:class:`~polykv_learn.learn.store.PrefillStore`) once: later epochs and runs reuse it. Items are
loaded lazily from disk, one prefill at a time.

With ``task_file`` (e.g. ``tasks/train.jsonl``, also written by ``prepare-data``), the training split also takes
task-format samples laid out as the evaluation lays them out (:mod:`polykv_learn.learn.task_rows`), each in one of
``task_protocols``: query-agnostic (compressed prefix = the context with its task instruction; probe = question,
answer prefix, gold answer) or query-aware (compressed prefix = context and question; probe = answer prefix, gold
answer), with the index where the gold answer starts (the learner may weight the answer's tokens). Each task type
and protocol joins the corpus sources in the round-robin, so a limit keeps every one. Only training-split rows of
task types that are not test-only are accepted (the generalisation protocol). Task samples are validated on next to
the corpus: ``task_val_samples`` rows of ``task_val_file`` (validation-split rows), or without it that many rows
held out of ``task_file``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from polykv_learn.capture import CaptureOptions
from polykv_learn.features import DEFAULT_OVERLAP_POLICIES
from polykv_learn.kvzip_global import check_allocation_prior
from polykv_learn.learn import checks
from polykv_learn.learn.shared import max_positions, shared_model, shared_tokenizer
from polykv_learn.learn.store import PrefillStore, StoredPrefill
from polykv_learn.learn.task_rows import (
    QUERY_AWARE,
    TASK_PROTOCOLS,
    assign_protocols,
    load_task_rows,
    split_task_rows,
    task_probe,
    task_probe_parts,
)
from polykv_learn.planner.head_allocator import HEAD_ALLOCATIONS
from polykv_learn.simulator import Simulator
from polykv_learn.text import leading_special_ids

__all__ = [
    "DEFAULT_BUDGETS",
    "PrefillDataModule",
    "check_datamodule_args",
    "load_task_rows",
    "split_task_rows",
    "task_probe",
    "task_probe_parts",
]

DEFAULT_BUDGETS = [64, 96, 128, 192, 256, 384, 512, 768, 1024]
SPLITS = {"train": "train", "validation": "validation"}


class _PrefillDataset(Dataset):
    def __init__(self, store: PrefillStore, ids: list[str]):
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> StoredPrefill:
        return self.store.load(self.ids[index])


def _round_robin(queues: list[list[dict]]) -> Iterator[dict]:
    for i in range(max((len(q) for q in queues), default=0)):
        for q in queues:
            if i < len(q):
                yield q[i]


def _interleave_sources(rows: Iterable[dict], seed: int) -> Iterator[dict]:
    """Rows round-robin over their ``source`` (shuffled within each source), so a limit keeps every source."""
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(str(row.get("source", "")), []).append(row)
    rng = random.Random(seed)
    queues = []
    for name in sorted(by_source):
        items = by_source[name]
        rng.shuffle(items)
        queues.append(items)
    return _round_robin(queues)


def _interleave_tasks(rows: Iterable[dict], seed: int) -> Iterator[dict]:
    """Task rows round-robin over their task type, each type's rows round-robin over their protocol (shuffled
    within each), so a limit keeps every task type first and both protocols of each."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(str(row["task"]), []).append(row)
    return _round_robin([list(_interleave_sources(by_task[name], seed)) for name in sorted(by_task)])


def _as_list(batch: list[StoredPrefill]) -> list[StoredPrefill]:
    return batch


class PrefillDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "data/polykv",
        cache_dir: str | None = None,
        model_name: str = "smollm2-135m",
        policies: list[str] | None = None,
        overlap_policies: list[str] = list(DEFAULT_OVERLAP_POLICIES),
        allocation_prior: str | None = None,
        head_allocation: str = "none",
        budgets: list[int] = list(DEFAULT_BUDGETS),
        max_context_tokens: int = 2048,
        min_context_tokens: int = 256,
        probe_tokens: int = 32,
        max_train_samples: int | None = 48,
        max_val_samples: int | None = 12,
        task_file: str | None = None,
        task_probe_tokens: int | None = None,
        task_val_samples: int = 0,
        task_val_file: str | None = None,
        task_protocols: list[str] = list(TASK_PROTOCOLS),
        window: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            data_dir: folder made by ``polykv-learn prepare-data`` (needs ``corpus/train.jsonl`` and
                ``corpus/validation.jsonl``).
            cache_dir: where the prefills are cached (default ``<data_dir>/prefills``); safe to share between runs.
            model_name: the base LLM (linked to ``model.model_name``).
            policies: policies whose ranks are cached (linked to ``model.policies``).
            overlap_policies: policies whose keep-set overlaps are features (linked to the model's).
            allocation_prior: the allocation prior whose column the prefills store (linked to the model's;
                ``kvzip_global`` runs KVzip's reconstruction pass in every prefill).
            head_allocation: how the learner shares a layer's budget among its KV heads (linked to the model's);
                ``learned``: the prefills also store per-KV-head signals (another store fingerprint), ``none`` and
                ``adakv`` store none.
            budgets: grid of average budgets at which layer features are cached (increasing integers >= 1); training
                samples from it and validation budgets must be in it.
            max_context_tokens: contexts are cut to at most this many tokens.
            min_context_tokens: shorter contexts are skipped.
            probe_tokens: probe tokens per sample (cut to at most this many).
            max_train_samples: use at most this many training samples (None: all).
            max_val_samples: use at most this many validation samples (None: all).
            task_file: also train on the task-format samples of this file (relative to ``data_dir``, e.g.
                ``tasks/train.jsonl``; train-split rows of task types that are not test-only), each laid out in one
                of ``task_protocols``; a sample whose compressed prefix (context, plus the question query-aware)
                is longer than ``max_context_tokens`` is skipped (a cut could drop the evidence). None: the corpus
                only.
            task_probe_tokens: probe tokens of a task sample (cut to at most this many; None: ``probe_tokens``).
                Long enough to hold the question and the gold answer, or the loss never sees the answer.
            task_val_samples: task samples validated on next to the ``max_val_samples`` corpus samples, so model
                selection also sees the task format. With ``task_val_file``: how many of its rows (an integer >= 1;
                round-robin over task types, then protocols; too long ones skipped). Without it: how many rows of
                ``task_file`` are held out from training (:func:`split_task_rows`); 0: validation on the corpus
                only.
            task_val_file: validate on the task samples of this file (relative to ``data_dir``, e.g.
                ``tasks/validation.jsonl``; validation-split rows of task types that are not test-only) instead of
                holding rows out of ``task_file``; needs ``task_val_samples`` >= 1. None: no validation file.
            task_protocols: the evaluation protocols task samples are laid out in, distinct values of
                ``query_agnostic`` (compressed prefix = context; probe = question, answer prefix, gold answer) and
                ``query_aware`` (compressed prefix = context and question; probe = answer prefix, gold answer).
                Each task sample is prefilled in one of them: per task type the rows take them in turn in file
                order (training and validation rows separately); a sample without a question stays
                query-agnostic.
            window: observation window of the captured statistics (queries of the last ``window`` positions).
            num_workers: data loader workers.
            seed: order in which samples are taken (sources interleaved, shuffled within each source).
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # for the artifact's config hash; not logged (the learner's are)
        check_datamodule_args(self.hparams)
        self.data_dir = Path(data_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else self.data_dir / "prefills"
        self.model_name = model_name
        self.policies = list(policies or [])
        self.overlap_policies = list(overlap_policies)
        self.allocation_prior = allocation_prior
        self.head_allocation = head_allocation
        self.budgets = list(budgets)
        self.max_context_tokens = max_context_tokens
        self.min_context_tokens = min_context_tokens
        self.probe_tokens = probe_tokens
        self.limits = {"train": max_train_samples, "validation": max_val_samples}
        self.task_file = self.data_dir / task_file if task_file else None
        self.task_probe_tokens = task_probe_tokens or probe_tokens
        self.task_val_samples = task_val_samples
        self.task_val_file = self.data_dir / task_val_file if task_val_file else None
        self.task_protocols = list(task_protocols)
        self.window = window
        self.num_workers = num_workers
        self.seed = seed
        self.check_data_dir()
        self._task_rows = self._read_task_files()
        self._store: PrefillStore | None = None
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []

    def check_data_dir(self) -> None:
        """Fail fast, before any prefill, when the corpus is missing."""
        missing = [str(self.corpus_file(s)) for s in SPLITS if not self.corpus_file(s).exists()]
        for path in (self.task_file, self.task_val_file):
            if path is not None and not path.exists():
                missing.append(str(path))
        if missing:
            raise FileNotFoundError(
                f"missing data file(s): {', '.join(missing)}; create them with "
                f"`polykv-learn prepare-data --out {self.data_dir}` (or point data.data_dir at such a folder)"
            )

    def _read_task_files(self) -> dict[str, list[dict]]:
        """The query-agnostic task rows of each split (checked line by line here, before any model load): all of
        ``task_file`` for training and ``task_val_file`` for validation, or ``task_val_samples`` rows of
        ``task_file`` held out for validation when there is no ``task_val_file``."""
        train = load_task_rows(self.task_file, "train") if self.task_file is not None else []
        if self.task_val_file is not None:
            return {"train": train, "validation": load_task_rows(self.task_val_file, "validation")}
        train, held = split_task_rows(train, self.task_val_samples)
        return {"train": train, "validation": held}

    def task_rows(self, split: str) -> list[dict]:
        """The task rows of ``split``, each in one of ``task_protocols`` (:func:`assign_protocols`)."""
        return assign_protocols(self._task_rows[split], self.task_protocols)

    def corpus_file(self, split: str) -> Path:
        return self.data_dir / "corpus" / f"{SPLITS[split]}.jsonl"

    @property
    def capture_options(self) -> CaptureOptions:
        """What every prefill records (the observation window of the layer features)."""
        return CaptureOptions(window=self.window)

    @property
    def store(self) -> PrefillStore:
        if self._store is None:
            sim = Simulator(shared_model(self.model_name), self.capture_options)
            root = self.cache_dir / self.model_name.replace("/", "_")
            self._store = PrefillStore(
                root, sim, self.policies, self.overlap_policies, self.budgets, self.allocation_prior,
                head_features=self.head_allocation == "learned",
            )  # fmt: skip
        return self._store

    def _tokenized(self, split: str) -> list[tuple[str, Tensor, Tensor, int | None]]:
        """(sample id, context ids, probe ids, index of the first gold-answer token in the probe or None)."""
        from datasets import load_dataset

        rows = list(load_dataset("json", data_files=str(self.corpus_file(split)), split="train"))
        task_rows = self.task_rows(split)
        if split == "train":  # task types and protocols join the corpus sources in the round-robin
            out = self._take(_interleave_sources(rows + task_rows, self.seed), self.limits[split])
        else:
            out = self._take(_interleave_sources(rows, self.seed), self.limits[split])
            limit = self.task_val_samples if self.task_val_file is not None else None
            out += self._take(_interleave_tasks(task_rows, self.seed), limit)
        if not out:
            raise ValueError(
                f"{self.corpus_file(split)} has no sample with >= {self.min_context_tokens} context tokens"
            )
        return out

    def _take(self, rows: Iterable[dict], limit: int | None) -> list[tuple[str, Tensor, Tensor, int | None]]:
        """Tokenised samples of ``rows`` in their order, at most ``limit``."""
        tok = shared_tokenizer(self.model_name)

        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False).input_ids if text else []

        lead = leading_special_ids(tok)  # e.g. Gemma3's BOS, once before the context, as the model was trained
        out = []
        for row in rows:
            answer_start = None
            if "probe_parts" in row:  # a task sample: whole, and tokenised in the evaluation's pieces
                context = [t for piece in row["context_parts"] for t in ids(piece)]
                if len(lead) + len(context) > self.max_context_tokens:
                    continue
                tail, answer = row["probe_parts"]
                probe = [t for piece in tail for t in ids(piece)]
                answer_start = len(probe)
                probe = (probe + ids(answer))[: self.task_probe_tokens]
                answer_start = min(answer_start, len(probe))
            else:
                context = tok(row["context"], add_special_tokens=False).input_ids
                probe = tok(row["probe"], add_special_tokens=False).input_ids[: self.probe_tokens]
            context = (lead + context)[: self.max_context_tokens]
            if len(context) < self.min_context_tokens or not probe:
                continue
            sample_id = f"{row['id']}|{len(context)}|{len(probe)}"
            if lead:  # never the prefill of the same row tokenised without them
                sample_id += "|s" + ".".join(map(str, lead))
            if answer_start is not None:
                sample_id += f"|a{answer_start}"
            if row.get("protocol") == QUERY_AWARE:
                sample_id += "|qa"  # never the query-agnostic sample of the same row
            out.append((sample_id, torch.tensor(context), torch.tensor(probe), answer_start))
            if limit is not None and len(out) >= limit:
                break
        return out

    def prepare_data(self) -> None:
        """Build the missing prefills (rank 0 only; each is written atomically). First the trainer's learner checks
        that this data module fits it (:meth:`PolyKVLearner.check_data`, before any model load), then temporary
        files of killed builds are removed (:meth:`PrefillStore.remove_stale`)."""
        from tqdm.auto import tqdm

        learner = self.trainer.lightning_module if self.trainer is not None else None
        if callable(getattr(learner, "check_data", None)):
            learner.check_data(self)
        self.store.remove_stale()
        for split in SPLITS:
            samples = self._tokenized(split)
            todo = [s for s in samples if not self.store.has(s[0])]
            for sample_id, context, probe, answer_start in tqdm(todo, desc=f"prefill {split}", disable=not todo):
                self.store.build(sample_id, context, probe, answer_start)

    def setup(self, stage: str | None = None) -> None:
        self.train_ids = [s[0] for s in self._tokenized("train")]
        self.val_ids = [s[0] for s in self._tokenized("validation")]
        missing = [i for i in self.train_ids + self.val_ids if not self.store.has(i)]
        if missing:  # e.g. a process that did not run prepare_data, or a cache cleared in between
            self.prepare_data()

    def feature_statistics(self) -> tuple[Tensor, Tensor]:
        """Mean and std of every feature over the training prefills (all layers and grid budgets)."""
        feats = torch.cat([self.store.load(i).features.reshape(-1, self.store_features_dim()) for i in self.train_ids])
        return feats.mean(0), feats.std(0)

    def head_feature_statistics(self) -> tuple[Tensor, Tensor]:
        """Mean and std of every per-head signal over the training prefills (all layers, heads and grid budgets)."""
        feats = [self.store.load_head_features(i) for i in self.train_ids]  # (K, L, G, Fh) each
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        return flat.mean(0), flat.std(0)

    def store_features_dim(self) -> int:
        return self.store.load(self.train_ids[0]).features.shape[-1]

    def calibration_features(self) -> Tensor:
        """Mean features (K, L, F) over the training prefills: what a static plan is decided from."""
        return torch.stack([self.store.load_features(i) for i in self.train_ids]).mean(0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            _PrefillDataset(self.store, self.train_ids),
            batch_size=1,
            shuffle=True,
            collate_fn=_as_list,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            _PrefillDataset(self.store, self.val_ids),
            batch_size=1,
            collate_fn=_as_list,
            num_workers=self.num_workers,
        )


def check_datamodule_args(hp: Any) -> None:
    """The one-line checks of every :class:`PrefillDataModule` argument (``hp``: its hyperparameters); the model's
    configuration is read (not its weights) to check that a context and its probe fit the model."""
    if hp.policies is not None:
        checks.policy_list("policies", hp.policies)
    checks.policy_list("overlap_policies", hp.overlap_policies)
    check_allocation_prior(hp.allocation_prior)
    checks.one_of("head_allocation", hp.head_allocation, HEAD_ALLOCATIONS)
    checks.budget_list("budgets", hp.budgets)
    checks.int_at_least("min_context_tokens", hp.min_context_tokens, 1)
    checks.int_at_least("max_context_tokens", hp.max_context_tokens, hp.min_context_tokens)
    checks.int_at_least("probe_tokens", hp.probe_tokens, 1)
    checks.int_at_least("task_probe_tokens", hp.task_probe_tokens, 1, optional=True)
    checks.int_at_least("max_train_samples", hp.max_train_samples, 1, optional=True)
    checks.int_at_least("max_val_samples", hp.max_val_samples, 1, optional=True)
    checks.distinct_choices("task_protocols", hp.task_protocols, TASK_PROTOCOLS)
    for name in ("task_file", "task_val_file"):
        if hp[name] is not None and not isinstance(hp[name], (str, os.PathLike)):
            raise ValueError(f"{name} must be a file path relative to data_dir (or null), got {hp[name]!r}")
    if hp.task_val_file is not None:
        if not checks.is_int(hp.task_val_samples) or hp.task_val_samples < 1:
            raise ValueError(
                "task_val_samples must be an integer >= 1 with a task_val_file (how many of its rows are validated "
                f"on), got {hp.task_val_samples!r}"
            )
    else:
        checks.int_at_least("task_val_samples", hp.task_val_samples, 0)
    if hp.task_val_samples and hp.task_file is None and hp.task_val_file is None:
        raise ValueError(
            f"task_val_samples must be >= 0 and needs a task_file (rows held out of it) or a task_val_file, "
            f"got {hp.task_val_samples}"
        )
    checks.int_at_least("window", hp.window, 1)
    checks.int_at_least("num_workers", hp.num_workers, 0)
    if not checks.is_int(hp.seed):
        raise ValueError(f"seed must be an integer, got {hp.seed!r}")
    for name in ("data_dir", "cache_dir"):
        value = hp[name]
        if value is None and name == "cache_dir":
            continue
        if not isinstance(value, (str, os.PathLike)) or Path(value).is_file():
            raise ValueError(f"{name} must be a folder path, got {value!r}")
    limit = max_positions(hp.model_name)
    longest = hp.max_context_tokens + max(hp.probe_tokens, hp.task_probe_tokens or 0)
    if limit is not None and longest > limit:
        raise ValueError(
            f"max_context_tokens + probe tokens ({longest}) exceed the model's context of {limit} tokens "
            f"({hp.model_name}); allowed: at most {limit} together"
        )
