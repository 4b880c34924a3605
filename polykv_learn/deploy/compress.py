"""Compressed generation with Hugging Face ``generate`` (design §7).

Two ways to use an eviction plan (static ``plan=``) or an adaptive ``planner=`` at generation time:

- pass a cache: ``model.generate(ids, cache=make_cache(model, plan), ...)`` (transformers 5.24 calls the generate
  kwarg ``cache``; the old name ``past_key_values`` still works there, with a deprecation warning);
- or a context manager: ``with compress(model, plan): model.generate(ids, ...)``: every ``generate`` call inside the
  block that brings no cache of its own gets a fresh :class:`~polykv_learn.cache.CompressedCache`.

The cache prefills with full attention, then keeps ``b_l`` context positions per KV head at layer ``l`` (all of them
when the prompt is not longer than ``b_l``); generated tokens are appended. Positions continue from the original
context length and each layer builds its own attention mask, with sdpa and eager attention alike.

Batches (left padding, with the ``attention_mask``): every row is compressed as if it ran alone: its keep sets come
from its own statistics, a budget at or above its own length keeps it whole, and padding is never kept. A planner
may return one ``Plan`` (applied to every row) or one per row. A layer holds its rows padded to the row that keeps
the most positions there, behind a mask; ``cache_bytes`` counts those padding slots (memory really allocated). A
plan with head budgets (``Plan.adakv``) keeps each KV head's own number of positions: a layer whose heads differ
holds one tensor per KV head (:mod:`polykv_learn.ragged`), each padded only across rows (``cache.padding_bytes``).

A cache serves one ``generate`` call: a second call with the same cache raises (``compress`` makes a fresh one per
call).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache, Planner
from polykv_learn.plan import Plan

__all__ = ["compress", "make_cache"]

#: every name under which ``generate`` accepts a cache (5.24: ``cache``; deprecated: the other two)
GENERATE_CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


def _check(model: PreTrainedModel, plan: Plan | None, planner: Planner | None) -> None:
    dims = adapter.model_dims(model)  # raises for an unsupported architecture, listing the supported ones
    if plan is None and planner is None:
        raise ValueError("give a fixed `plan` or an adaptive `planner` to compress the cache with")
    if plan is not None and planner is not None:
        raise ValueError("give either a fixed `plan` or an adaptive `planner`, not both")
    if plan is not None:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a polykv_learn.plan.Plan, got {type(plan).__name__}")
        plan.check_dims(dims.num_layers, dims.num_kv_heads)
    if planner is not None and not callable(planner):
        raise TypeError(
            "planner must be callable (list[LayerStats] -> a Plan or one Plan per batch row), "
            f"got {type(planner).__name__}"
        )


def make_cache(model: PreTrainedModel, plan: Plan | None = None, planner: Planner | None = None) -> CompressedCache:
    """A fresh :class:`CompressedCache` for one ``generate`` call (or one ``model(...)`` prefill); a second
    ``generate`` call with it raises ValueError.

    ``plan``: evict each layer to ``(policy_l, b_l)`` right after its prefill (every row of a batch alike);
    ``planner``: ``fn(stats)`` decides once all layers are prefilled; ``stats`` are the batched statistics of every
    layer (:func:`~polykv_learn.cache.row_stats` gives one row's, cut to its real tokens) and it returns one
    ``Plan`` for every row or a list with one ``Plan`` per row. Raises ValueError for an unsupported
    architecture, a plan with another number of layers than the model, or neither/both of ``plan`` and
    ``planner`` (budgets >= 1 are checked by :class:`Plan` itself). Switches the model to the polykv wrapper of
    its attention (harmless for other caches).
    """
    _check(model, plan, planner)
    return CompressedCache(model, plan=plan, planner=planner)


def _brings_cache(kwargs: dict[str, Any]) -> bool:
    return kwargs.get("use_cache") is False or any(kwargs.get(name) is not None for name in GENERATE_CACHE_KWARGS)


@contextlib.contextmanager
def compress(
    model: PreTrainedModel,
    plan: Plan | None = None,
    planner: Planner | None = None,
    cache_factory: Callable[[], Cache] | None = None,
) -> Iterator[PreTrainedModel]:
    """Within the block, ``model.generate(...)`` compresses its cache with ``plan`` (or ``planner``).

    ``cache_factory`` (instead of ``plan``/``planner``): a zero-argument function returning the fresh cache of
    each call (e.g. a learned router's). A call that passes its own cache (or ``use_cache=False``) is left alone.
    ``model.generate`` and the model's attention implementation are restored on exit, also when the block
    raises. Yields the model.
    """
    if cache_factory is None:
        _check(model, plan, planner)

        def cache_factory() -> Cache:
            return make_cache(model, plan=plan, planner=planner)

    elif plan is not None or planner is not None:
        raise ValueError("give either `cache_factory` or a `plan`/`planner`, not both")
    elif not callable(cache_factory):
        raise TypeError(f"cache_factory must be callable () -> Cache, got {type(cache_factory).__name__}")
    else:
        adapter.check_supported(model)
    missing = object()
    previous = model.__dict__.get("generate", missing)  # an instance attribute (e.g. an outer compress block)
    inner = model.generate
    kwarg = adapter.cache_kwarg(model)

    @functools.wraps(inner)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if not _brings_cache(kwargs):
            kwargs[kwarg] = cache_factory()
        return inner(*args, **kwargs)

    model.generate = generate
    try:
        with adapter.polykv_attention(model):
            yield model
    finally:
        if previous is missing:
            model.__dict__.pop("generate", None)
        else:
            model.generate = previous
