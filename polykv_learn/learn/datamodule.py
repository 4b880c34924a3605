"""``PrefillDataModule``: the training corpus (Hugging Face ``datasets``) and its cached context prefills.

Reads ``<data_dir>/corpus/{train,validation}.jsonl`` (written by ``polykv-learn prepare-data``; one sample per line
with ``id``, ``context`` and ``probe`` text), tokenizes with the model's tokenizer, and in ``prepare_data`` builds
the prefill cache (:class:`~polykv_learn.learn.store.PrefillStore`) once: later epochs and runs reuse it. Items are
loaded lazily from disk, one prefill at a time.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from polykv_learn.features import DEFAULT_OVERLAP_POLICIES
from polykv_learn.learn.shared import shared_model, shared_tokenizer
from polykv_learn.learn.store import PrefillStore, StoredPrefill
from polykv_learn.policies import check_policy_name
from polykv_learn.simulator import Simulator

DEFAULT_BUDGETS = [64, 96, 128, 192, 256, 384, 512, 768, 1024]
SPLITS = {"train": "train", "validation": "validation"}


class _PrefillDataset(Dataset):
    def __init__(self, store: PrefillStore, ids: list[str]):
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> StoredPrefill:
        return self.store.load(self.ids[index])


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
    for i in range(max((len(q) for q in queues), default=0)):
        for q in queues:
            if i < len(q):
                yield q[i]


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
        budgets: list[int] = list(DEFAULT_BUDGETS),
        max_context_tokens: int = 2048,
        min_context_tokens: int = 256,
        probe_tokens: int = 32,
        max_train_samples: int | None = 48,
        max_val_samples: int | None = 12,
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
            budgets: grid of average budgets at which layer features are cached; training samples from it and
                validation budgets must be in it.
            max_context_tokens: contexts are cut to at most this many tokens.
            min_context_tokens: shorter contexts are skipped.
            probe_tokens: probe tokens per sample (cut to at most this many).
            max_train_samples: use at most this many training samples (None: all).
            max_val_samples: use at most this many validation samples (None: all).
            window: observation window of the captured statistics (queries of the last ``window`` positions).
            num_workers: data loader workers.
            seed: order in which samples are taken (sources interleaved, shuffled within each source).
        """
        super().__init__()
        self.data_dir = Path(data_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else self.data_dir / "prefills"
        self.model_name = model_name
        self.policies = list(policies or [])
        for name in [*self.policies, *overlap_policies]:
            check_policy_name(name)
        self.overlap_policies = list(overlap_policies)
        if not budgets or any(int(b) < 1 for b in budgets):
            raise ValueError(f"budgets must be a non-empty list of positive integers, got {budgets}")
        self.budgets = sorted({int(b) for b in budgets})
        if not 1 <= min_context_tokens <= max_context_tokens or probe_tokens < 1:
            raise ValueError("need 1 <= min_context_tokens <= max_context_tokens and probe_tokens >= 1")
        self.max_context_tokens = max_context_tokens
        self.min_context_tokens = min_context_tokens
        self.probe_tokens = probe_tokens
        self.limits = {"train": max_train_samples, "validation": max_val_samples}
        self.window = window
        self.num_workers = num_workers
        self.seed = seed
        self.check_data_dir()
        self._store: PrefillStore | None = None
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []

    def check_data_dir(self) -> None:
        """Fail fast, before any prefill, when the corpus is missing."""
        missing = [str(self.corpus_file(s)) for s in SPLITS if not self.corpus_file(s).exists()]
        if missing:
            raise FileNotFoundError(
                f"missing corpus file(s): {', '.join(missing)}; create them with "
                f"`polykv-learn prepare-data --out {self.data_dir}` (or point data.data_dir at such a folder)"
            )

    def corpus_file(self, split: str) -> Path:
        return self.data_dir / "corpus" / f"{SPLITS[split]}.jsonl"

    @property
    def store(self) -> PrefillStore:
        if self._store is None:
            from polykv_learn.capture import CaptureOptions

            sim = Simulator(shared_model(self.model_name), CaptureOptions(window=self.window))
            root = self.cache_dir / self.model_name.replace("/", "_")
            self._store = PrefillStore(root, sim, self.policies, self.overlap_policies, self.budgets)
        return self._store

    def _tokenized(self, split: str) -> list[tuple[str, Tensor, Tensor]]:
        from datasets import load_dataset

        rows = load_dataset("json", data_files=str(self.corpus_file(split)), split="train")
        tok = shared_tokenizer(self.model_name)
        out = []
        for row in _interleave_sources(rows, self.seed):
            context = tok(row["context"], add_special_tokens=False).input_ids[: self.max_context_tokens]
            probe = tok(row["probe"], add_special_tokens=False).input_ids[: self.probe_tokens]
            if len(context) < self.min_context_tokens or not probe:
                continue
            sample_id = f"{row['id']}|{len(context)}|{len(probe)}"
            out.append((sample_id, torch.tensor(context), torch.tensor(probe)))
            limit = self.limits[split]
            if limit is not None and len(out) >= limit:
                break
        if not out:
            raise ValueError(
                f"{self.corpus_file(split)} has no sample with >= {self.min_context_tokens} context tokens"
            )
        return out

    def prepare_data(self) -> None:
        """Build the missing prefills (rank 0 only; each is written atomically)."""
        from tqdm.auto import tqdm

        for split in SPLITS:
            samples = self._tokenized(split)
            todo = [s for s in samples if not self.store.has(s[0])]
            for sample_id, context, probe in tqdm(todo, desc=f"prefill {split}", disable=not todo):
                self.store.build(sample_id, context, probe)

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
