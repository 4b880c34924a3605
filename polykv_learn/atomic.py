"""Crash-safe writes: every file and folder the package produces appears whole or not at all.

- ``atomic_file(path)``: a context manager yielding a temporary path next to ``path``; on success it is renamed
  onto ``path`` (one ``os.replace``), on any error it is removed and ``path`` is untouched.
- ``atomic_write_text(path, chunks)`` / ``atomic_write_bytes(path, data)``: the same for text or bytes.
- ``atomic_dir(path)``: the same for a whole folder. Replacing an existing folder is one atomic swap
  (Linux ``renameat2(RENAME_EXCHANGE)``), so a crash at any point leaves the old or the new folder at ``path``;
  where the swap is not available the old folder is moved aside first and :func:`recover_dir` puts it back.
- ``remove_stale(folder, pattern)``: removes temporary files a killed process left behind.

Files and folders get the permissions the process umask allows (``tempfile`` alone would make them 0600/0700).
Temporary names start with ``.`` and contain ``.tmp-`` so that they are easy to recognise and clean.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "atomic_dir",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "recover_dir",
    "remove_stale",
]

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it onto ``path`` when the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARK}", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], chunks: Iterable[str] | str) -> None:
    """Write text (a string or an iterable of chunks) to ``path`` atomically, creating parent folders."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for chunk in [chunks] if isinstance(chunks, str) else chunks:
            handle.write(chunk)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: no exchange on this kernel or file system
        return False
    raise OSError(errno, f"cannot swap {a} and {b}: {os.strerror(errno)}")


def recover_dir(path: str | os.PathLike[str]) -> bool:
    """If ``path`` is missing but a moved-aside old copy of it exists (a replace interrupted between its two
    renames, where no atomic swap was available), move the newest copy back. Returns whether it did."""
    target = Path(path)
    if target.exists() or not target.parent.is_dir():
        return False
    olds = sorted(target.parent.glob(f".{target.name}{OLD_MARK}*"), key=lambda p: p.stat().st_mtime)
    for old in reversed(olds):
        if (old / "content").is_dir():
            os.replace(old / "content", target)
            shutil.rmtree(old, ignore_errors=True)
            return True
    return False


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; when the block succeeds it replaces ``path`` in one step."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if not target.exists():
            os.replace(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_MARK}", dir=target.parent))
            os.replace(target, old / "content")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale(folder: str | os.PathLike[str], older_than_s: float = 0.0) -> list[Path]:
    """Remove temporary files and folders (``.*.tmp-*``) a killed writer left in ``folder``; returns them.

    ``older_than_s`` spares the ones younger than that (a writer that is still running)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in root.glob(f".*{TMP_MARK}*"):
        try:
            if now - entry.lstat().st_mtime < older_than_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            continue
    return removed
