"""On-disk cache of context prefills: what training and validation need of one (context, probe) pair.

One safetensors file per sample, written to a temporary name and renamed (never half-written; through
:func:`polykv_learn.atomic.atomic_file`, so files get the permissions the process umask allows), read lazily
(memory-mapped) so a dataset of many prefills streams instead of sitting in RAM. A file records the fingerprint of
what made it (model geometry, policies, budgets grid, capture options, and KVzip's repeat prompt when a policy
needs it); a stale or foreign file is rebuilt. A file holds ranks and features, never raw statistics, so a new
policy changes the fingerprint of the stores that route to it and no other's.

A temporary name carries its writer's host and process id (``.<file>.tmp-XXXX.w-<host>-<pid>``);
:meth:`PrefillStore.remove_stale` deletes the ones whose writer is gone (a killed build) and never those of a
build still running. Temporary files it cannot attribute to a process of this host (another host of a shared
folder, or the older ``.tmp-*.safetensors`` names) are deleted once older than ``STALE_AFTER_S``.

Contents of a file (``L`` layers, ``G`` KV heads, ``n`` context tokens, ``m`` probe tokens, ``K`` grid budgets):
- ``k.{l}``, ``v.{l}``: context keys/values ``(G, n, d)`` (float16, the probe pass upcasts them);
- ``rank.{l}.{policy}``: rank of every position under the policy ``(G, n)`` (int32; 0 = kept first);
- ``features``: layer signals ``(K, L, F)`` at each budget of the grid; ``budgets``: ``(K,)``;
- ``probe_ids``: ``(m,)``; ``full_logprobs``: full-cache next-token log-probs of the probe ``(m, V)`` (float16);
- ``answer_start`` (task samples only): ``(1,)`` index of the probe's first gold-answer token;
- ``windows``: ``(L,)`` each layer's sliding window ``W`` (0: full attention), so that a sliding layer keeps only
  its window's positions (``ContextCapture.keep_mask``) as a fresh capture and the real cache do;
- ``head_features`` (stores made for a learned head allocator only): per-KV-head signals ``(K, L, G, Fh)``
  (:mod:`polykv_learn.head_features`) at each budget of the grid.

Format versions: 2 added ``windows``. A model whose layers all attend fully has no window to keep, so its stores
keep their version-1 fingerprint (their files are read as before, every window None); a sliding-window model's
fingerprint names version 2 and its windows, so a file written without them is never read for it (rebuilt).
A store with ``head_features`` names their columns in its fingerprint (other stores keep theirs and their files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from polykv_learn.adapter import sliding_windows
from polykv_learn.atomic import TMP_MARK, atomic_file
from polykv_learn.features import layer_features
from polykv_learn.head_features import HEAD_FEATURE_NAMES, head_features
from polykv_learn.kvzip_global import check_allocation_prior, normalised_scores, prior_column
from polykv_learn.policies import get_policy
from polykv_learn.reconstruct import repeat_prompt_ids
from polykv_learn.reconstruct_chunked import reconstruct_scope_entry
from polykv_learn.simulator import ContextCapture, Simulator

FORMAT_VERSION = 2  # files hold each layer's window
FULL_ATTENTION_VERSION = 1  # the fingerprint version of a model without sliding layers (its files did not change)
STALE_AFTER_S = 24 * 3600.0  # age after which an unattributable temporary file counts as left behind
_WRITER = re.compile(r"\.w-(?P<host>.+)-(?P<pid>\d+)$")


def writer_tag() -> str:
    """The suffix of this process's temporary names: its host and process id."""
    return f".w-{socket.gethostname()}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StoredPrefill:
    """One cached prefill, loaded."""

    sample_id: str
    keys: list[Tensor]  # L x (G, n, d)
    values: list[Tensor]  # L x (G, n, d)
    ranks: dict[tuple[int, str], Tensor]  # (layer, policy) -> (G, n)
    features: Tensor  # (K, L, F)
    budgets: Tensor  # (K,)
    probe_ids: Tensor  # (m,)
    full_logprobs: Tensor  # (m, V)
    answer_start: int | None = None  # probe index of the first gold-answer token (task samples)
    windows: list[int | None] | None = None  # L: each layer's sliding window W, None for full attention
    head_features: Tensor | None = None  # (K, L, G, Fh) per-KV-head signals (stores with head_features only)

    @property
    def context_length(self) -> int:
        return self.keys[0].shape[1]

    def to_capture(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ContextCapture:
        """A :class:`ContextCapture` for the simulator's probe pass (ranks precomputed, no raw statistics)."""
        return ContextCapture(
            keys=[k.to(device=device, dtype=dtype) for k in self.keys],
            values=[v.to(device=device, dtype=dtype) for v in self.values],
            stats=[],
            last_logits=torch.empty(0),
            _ranks={key: r.to(device) for key, r in self.ranks.items()},
            windows=list(self.windows) if self.windows is not None else [None] * len(self.keys),
        )

    def features_at(self, budget: int) -> Tensor:
        """Layer signals ``(L, F)`` at the grid budget ``budget``."""
        hits = (self.budgets == budget).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"budget {budget} is not in this prefill's grid {self.budgets.tolist()}")
        return self.features[hits[0, 0]]

    def head_features_at(self, budget: int) -> Tensor:
        """Per-KV-head signals ``(L, G, Fh)`` at the grid budget ``budget`` (a store built with ``head_features``)."""
        if self.head_features is None:
            raise ValueError(f"prefill {self.sample_id!r} holds no per-head features (its store has head_features off)")
        hits = (self.budgets == budget).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"budget {budget} is not in this prefill's grid {self.budgets.tolist()}")
        return self.head_features[hits[0, 0]]


class PrefillStore:
    """A folder of cached prefills for one model, policy set, budget grid and capture setting."""

    def __init__(
        self,
        root: str | Path,
        simulator: Simulator,
        policies: Sequence[str],
        overlap_policies: Sequence[str],
        budgets: Sequence[int],
        allocation_prior: str | None = None,
        head_features: bool = False,
    ):
        self.windows = sliding_windows(simulator.model)  # L: W of a sliding layer, None for full attention
        self.root = Path(root)
        self.simulator = simulator
        self.policies = list(policies)
        self.overlap_policies = list(overlap_policies)
        self.allocation_prior = check_allocation_prior(allocation_prior)
        self.budgets = sorted({int(b) for b in budgets})
        self.head_features = bool(head_features)
        opts = simulator.capture_options
        used = [get_policy(p) for p in {*self.policies, *self.overlap_policies}]
        self.accumulate = any(p.needs_accumulated_attn for p in used)
        self.reconstruct = any(p.needs_reconstruct_attn for p in used) or allocation_prior == "kvzip_global"
        sliding = any(w is not None for w in self.windows)
        made_by = {
            "version": FORMAT_VERSION if sliding else FULL_ATTENTION_VERSION,
            "model": simulator.dims.to_dict(),
            "policies": self.policies,
            "overlap_policies": self.overlap_policies,
            "budgets": self.budgets,
            "capture": [opts.window, opts.future, opts.chunk],
        }
        if allocation_prior is not None:  # one more feature column (other stores keep their files)
            made_by["allocation_prior"] = allocation_prior
        if self.head_features:  # one more tensor (other stores keep their files)
            made_by["head_features"] = list(HEAD_FEATURE_NAMES)
        if sliding:  # what a stored sliding layer keeps depends on its window
            made_by["windows"] = self.windows
        if self.reconstruct and opts.reconstruct_scope != "full":  # the chunk-local scores (the full scope's
            # stores, all made before the option, keep their fingerprint: no key for them)
            made_by["reconstruct_scope"] = reconstruct_scope_entry(simulator.model, opts)
        elif self.reconstruct:  # KVzip's ranks depend on the repeat prompt (only then: other stores keep their files)
            made_by["reconstruct_prompt"] = list(repeat_prompt_ids(simulator.model, opts))
        self.fingerprint = json.dumps(made_by, sort_keys=True)

    def path_for(self, sample_id: str) -> Path:
        digest = hashlib.sha1(f"{self.fingerprint}|{sample_id}".encode()).hexdigest()[:20]
        return self.root / f"{digest}.safetensors"

    def has(self, sample_id: str) -> bool:
        path = self.path_for(sample_id)
        if not path.exists():
            return False
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # unreadable (e.g. truncated by a crash outside our atomic write): rebuild
            return False
        return meta.get("fingerprint") == self.fingerprint and meta.get("sample_id") == sample_id

    @torch.no_grad()
    def build(self, sample_id: str, context_ids: Tensor, probe_ids: Tensor, answer_start: int | None = None) -> Path:
        """Prefill one context and write its file atomically (skipped when a valid file exists). ``answer_start``:
        where the gold answer starts in the probe (task samples; ``0 <= answer_start <= m``)."""
        if answer_start is not None and not 0 <= answer_start <= probe_ids.numel():
            raise ValueError(f"answer_start must be in [0, {probe_ids.numel()}] (the probe length), got {answer_start}")
        path = self.path_for(sample_id)
        if self.has(sample_id):
            return path
        sim = self.simulator
        capture = sim.capture(context_ids, accumulate=self.accumulate, reconstruct=self.reconstruct)
        num_layers = capture.num_layers
        n = capture.context_length
        tensors: dict[str, Tensor] = {}
        for layer in range(num_layers):
            tensors[f"k.{layer}"] = capture.keys[layer].to(torch.float16).contiguous()
            tensors[f"v.{layer}"] = capture.values[layer].to(torch.float16).contiguous()
            for policy in self.policies:
                tensors[f"rank.{layer}.{policy}"] = capture.ranks(layer, policy).to(torch.int32).contiguous()
        layer_ranks = [
            {p: capture.ranks(layer, p)[None] for p in self.overlap_policies} for layer in range(num_layers)
        ]  # the keep set at any budget is rank < budget: no sort per budget
        feats = [
            torch.cat(
                [
                    layer_features(
                        capture.stats[layer], min(b, n), self.overlap_policies, num_layers, layer_ranks[layer]
                    )
                    for layer in range(num_layers)
                ]
            )
            for b in self.budgets
        ]
        if self.allocation_prior is not None:  # the prior's column, computed across layers, appended
            scores = [normalised_scores(s) for s in capture.stats]  # L x (G, n)
            feats = [
                torch.cat([f, prior_column(scores, min(b, n))[:, None]], dim=1)
                for f, b in zip(feats, self.budgets, strict=True)
            ]
        tensors["features"] = torch.stack(feats).float().contiguous()  # (K, L, F)
        tensors["budgets"] = torch.tensor(self.budgets, dtype=torch.int64)
        if self.head_features:
            heads = [
                torch.cat([head_features(capture.stats[layer], min(b, n), num_layers) for layer in range(num_layers)])
                for b in self.budgets
            ]  # K x (L, G, Fh)
            tensors["head_features"] = torch.stack(heads).float().contiguous()  # (K, L, G, Fh)
        probe_ids = probe_ids.reshape(-1).long()
        tensors["probe_ids"] = probe_ids.contiguous()
        zero_bias = [torch.zeros(1, *k.shape[:2], dtype=k.dtype) for k in capture.keys]
        full = sim.probe_logits(capture, probe_ids, zero_bias)[0]  # (m, V)
        tensors["full_logprobs"] = torch.log_softmax(full, dim=-1).to(torch.float16).contiguous()
        if answer_start is not None:
            tensors["answer_start"] = torch.tensor([answer_start], dtype=torch.int64)
        tensors["windows"] = torch.tensor([w or 0 for w in self.windows], dtype=torch.int64)
        with atomic_file(path, suffix=writer_tag()) as tmp:
            save_file(tensors, tmp, metadata={"fingerprint": self.fingerprint, "sample_id": sample_id})
        return path

    def remove_stale(self, now: float | None = None) -> list[Path]:
        """Delete the temporary files of builds that were killed: those whose writer process (named in the file
        name) is gone; ones of another host or without a writer tag once older than ``STALE_AFTER_S``. A build
        still running keeps its file. Returns the deleted paths."""
        if not self.root.is_dir():
            return []
        now = time.time() if now is None else now
        host = socket.gethostname()
        removed = []
        candidates = {*self.root.glob(f".*{TMP_MARK}*"), *self.root.glob(".tmp-*.safetensors")}
        for entry in sorted(candidates):
            match = _WRITER.search(entry.name)
            try:
                if match and match["host"] == host:
                    stale = not process_alive(int(match["pid"]))
                else:
                    stale = now - entry.lstat().st_mtime > STALE_AFTER_S
                if stale and entry.is_file():
                    entry.unlink()
                    removed.append(entry)
            except FileNotFoundError:  # its writer finished (renamed it) meanwhile
                continue
        return removed

    def load_features(self, sample_id: str) -> Tensor:
        """Only the layer signals ``(K, L, F)`` of one cached prefill (cheap: K/V are not read)."""
        if not self.has(sample_id):
            raise FileNotFoundError(f"no valid cached prefill for sample {sample_id!r}")
        with safe_open(self.path_for(sample_id), framework="pt") as f:
            return f.get_tensor("features")

    def load_head_features(self, sample_id: str) -> Tensor:
        """Only the per-KV-head signals ``(K, L, G, Fh)`` of one cached prefill (a store with ``head_features``)."""
        if not self.head_features:
            raise ValueError("this store holds no per-head features (head_features is off)")
        if not self.has(sample_id):
            raise FileNotFoundError(f"no valid cached prefill for sample {sample_id!r}")
        with safe_open(self.path_for(sample_id), framework="pt") as f:
            return f.get_tensor("head_features")

    def load(self, sample_id: str) -> StoredPrefill:
        path = self.path_for(sample_id)
        if not self.has(sample_id):
            raise FileNotFoundError(f"no valid cached prefill for sample {sample_id!r} (expected {path})")
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            num_layers = sum(1 for name in names if name.startswith("k."))
            ranks = {
                (layer, policy): f.get_tensor(f"rank.{layer}.{policy}").long()
                for layer in range(num_layers)
                for policy in self.policies
            }
            return StoredPrefill(
                sample_id=sample_id,
                keys=[f.get_tensor(f"k.{layer}") for layer in range(num_layers)],
                values=[f.get_tensor(f"v.{layer}") for layer in range(num_layers)],
                ranks=ranks,
                features=f.get_tensor("features"),
                budgets=f.get_tensor("budgets"),
                probe_ids=f.get_tensor("probe_ids"),
                full_logprobs=f.get_tensor("full_logprobs").float(),
                answer_start=int(f.get_tensor("answer_start")[0]) if "answer_start" in names else None,
                windows=self._stored_windows(f, names, num_layers),
                head_features=f.get_tensor("head_features") if "head_features" in names else None,
            )

    def _stored_windows(self, f, names: set[str], num_layers: int) -> list[int | None]:
        """Each layer's window as the file records it (files of the full-attention format version 1 record none:
        all None, which is what this store's fingerprint, checked by :meth:`has`, says they hold)."""
        if "windows" not in names:
            return [None] * num_layers
        return [int(w) or None for w in f.get_tensor("windows").tolist()]
