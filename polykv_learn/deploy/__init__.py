"""Deployment: compressed KV caches inside Hugging Face ``generate`` (``compress``, ``make_cache``) and the frozen
learned router (``PolyKV``, imported on first use)."""

from typing import Any

from polykv_learn.deploy.compress import compress, make_cache

__all__ = ["PolyKV", "compress", "make_cache"]


def __getattr__(name: str) -> Any:
    if name == "PolyKV":
        from polykv_learn.deploy.polykv import PolyKV

        return PolyKV
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
