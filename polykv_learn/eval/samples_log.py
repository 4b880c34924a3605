"""``samples.jsonl``: the evaluation's per-sample log, appended as the run goes, which ``--resume`` continues.

Line 1 is the run's header ``{"polykv_evaluate_samples": 1, "config": {...}, "fingerprint": {...}}``: ``config``
is the run's settings as ``results.json`` records them (but the model's own name, known only once it has loaded);
``fingerprint`` holds what else decides the records: the batch and group sizes, whether rows stop once settled,
and digests of the selected samples and of the router artifacts. Every further line is one finished sample:
``{"id", "context_tokens", "seconds", "records": [...], "plans": {method: {budget: example plan}}}``.

Each line goes to the file in one write, flushed and fsync'd, so a killed run loses at most the sample in
flight. A torn last line (a kill in the middle of that write) is ignored when the file is read and cut off before
the next append. Any other damage is an error: the file is the run's only record of the samples it finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from polykv_learn.atomic import atomic_write_text

__all__ = ["FORMAT", "SAMPLES_FILE", "SamplesLog", "digest", "read_samples_file"]

SAMPLES_FILE = "samples.jsonl"
FORMAT = 1
_MARK = "polykv_evaluate_samples"
ENTRY_KEYS = ("id", "context_tokens", "seconds", "records", "plans")


def digest(obj: Any) -> str:
    """SHA-256 of ``obj``'s canonical JSON (sorted keys): equal for equal JSON values."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_samples_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]], int, bool]:
    """``(header, entries, good_bytes, torn)`` of a ``samples.jsonl``: ``good_bytes`` is the length of its complete
    lines, ``torn`` whether a torn last line was left out. Raises ``ValueError`` naming the line of any damage."""
    path = Path(path)
    data = path.read_bytes()
    *complete, tail = data.split(b"\n")
    torn = bool(tail)  # bytes after the last newline: a line whose write was cut short
    parsed: list[Any] = []
    good = 0
    for lineno, raw in enumerate(complete, start=1):
        try:
            parsed.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(
                f"{path}:{lineno}: not a JSON line; the file is damaged (only a torn last line is skipped): "
                "repair or remove it, or evaluate into another --out"
            ) from None
        good += len(raw) + 1
    header = parsed[0] if parsed else None
    if not isinstance(header, dict) or header.get(_MARK) != FORMAT:
        raise ValueError(
            f"{path}:1: not the header of a samples.jsonl written by polykv-learn evaluate (format {FORMAT}); "
            "evaluate into another --out"
        )
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for lineno, entry in enumerate(parsed[1:], start=2):
        if not isinstance(entry, dict) or any(k not in entry for k in ENTRY_KEYS):
            raise ValueError(f"{path}:{lineno}: not a sample entry (needs keys {', '.join(ENTRY_KEYS)})")
        if entry["id"] in seen:
            raise ValueError(f"{path}:{lineno}: sample {entry['id']!r} is recorded twice; the file is damaged")
        seen.add(entry["id"])
        entries.append(entry)
    return header, entries, good, torn


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."  # a digest (66 characters) is shown whole


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: recorded X, now Y"`` for every setting of the header that differs."""
    out = []
    for part in ("config", "fingerprint"):
        old, new = recorded.get(part, {}), current.get(part, {})
        for key in [*old, *(k for k in new if k not in old)]:
            if old.get(key) != new.get(key):
                out.append(f"{key}: recorded {_short(old.get(key))}, now {_short(new.get(key))}")
    return out


@dataclass
class SamplesLog:
    """The ``samples.jsonl`` of one ``--out`` folder: checked by :meth:`prepare` (no writes), then :meth:`start`
    and :meth:`append` per finished sample, :meth:`close` at the end."""

    path: Path
    header: dict[str, Any]
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample id -> entry of the run resumed
    good_bytes: int = 0  # length of the existing file's complete lines (0: a new file)
    torn: bool = False  # the existing file ended in a torn line, cut off by start()
    _handle: IO[bytes] | None = None

    @classmethod
    def prepare(cls, out_dir: str | os.PathLike[str], header: dict[str, Any], resume: bool) -> SamplesLog:
        """Check ``out_dir``'s log against ``header`` and read what an earlier run finished; writes nothing.

        Without ``resume`` an existing non-empty log is refused; with it, the recorded settings must equal
        ``header``'s (a missing or empty log starts a new run)."""
        path = Path(out_dir) / SAMPLES_FILE
        if path.exists() and not path.is_file():
            raise ValueError(f"{path} is not a file; evaluate into another --out")
        if not path.is_file() or path.stat().st_size == 0:
            return cls(path, header)
        if not resume:
            raise ValueError(
                f"{path} already holds the samples of an earlier run; use --resume to continue it, or another --out"
            )
        recorded, entries, good, torn = read_samples_file(path)
        differ = _differences(recorded, header)
        if differ:
            raise ValueError(
                f"--resume: {path} was recorded with other settings ({'; '.join(differ)}); resume with the recorded "
                "settings, or evaluate into another --out"
            )
        return cls(path, header, {e["id"]: e for e in entries}, good, torn)

    def start(self) -> None:
        """Open the log for appending: a new file gets the header; a torn last line is cut off."""
        if self.good_bytes == 0:
            atomic_write_text(self.path, json.dumps(self.header, ensure_ascii=False) + "\n")
        elif self.path.stat().st_size != self.good_bytes:
            os.truncate(self.path, self.good_bytes)
        self._handle = open(self.path, "ab")  # noqa: SIM115 (held open for the whole run; closed by close())

    def append(self, entry: dict[str, Any]) -> None:
        """One finished sample, durable once this returns (one write, flush, fsync)."""
        if self._handle is None:
            raise RuntimeError("SamplesLog.append before start()")
        self._handle.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
