"""Keeping a long evaluation's memory flat: cyclic garbage collected and freed heap pages returned to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Any

__all__ = ["release_free_memory"]


def release_free_memory() -> bool:
    """Collect cyclic garbage, then return the allocator's free heap memory to the OS (glibc ``malloc_trim(0)``);
    False where trimming is unavailable.

    Each sample allocates and frees gigabytes of differently sized buffers (prefill statistics, padded fork
    batches). glibc keeps freed heap pages, so without trimming an evaluation process's resident memory grows far
    beyond its live tensors from sample to sample.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``); None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
