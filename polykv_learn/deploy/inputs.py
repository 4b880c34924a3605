"""Argument checks of :class:`~polykv_learn.deploy.polykv.PolyKV`'s entry points: one sequence's prefill statistics
(:meth:`PolyKV.features`, :meth:`PolyKV.plan_for_stats`) and the ``input_ids`` / left-padded ``attention_mask`` of
:meth:`PolyKV.plan_for`. Each raises a one-line ValueError that says what was expected and what came."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from polykv_learn.cache import row_stats
from polykv_learn.policies import LayerStats

__all__ = ["check_inputs", "one_sequence"]


def one_sequence(stats: Sequence[LayerStats], method: str) -> list[LayerStats]:
    """``stats`` of a one-row batch, cut to its real tokens; ValueError for a larger batch."""
    batch = stats[0].valid.shape[0]
    if batch != 1:
        raise ValueError(
            f"{method} takes the statistics of one sequence, got a batch of {batch}: use plans_for_stats "
            "(one plan per row) or row_stats(stats, row) per row"
        )
    return [row_stats(s, 0) for s in stats]


def check_inputs(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``input_ids`` (n,) or (batch, n) and its mask -> (batch, n) ids and mask (None: no padding)."""
    if not isinstance(input_ids, Tensor) or input_ids.ndim not in (1, 2) or input_ids.shape[-1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a tensor of shape (n,) or (batch, n) with n >= 1, got {shape}")
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    ids = input_ids if input_ids.ndim == 2 else input_ids[None]
    if attention_mask is None:
        return ids, None
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    mask = attention_mask.reshape(ids.shape).long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    for r in range(mask.shape[0]):
        n_real = int(mask[r].sum())
        if n_real == 0:
            raise ValueError(f"row {r} of attention_mask has no token (all zeros)")
        if not bool(mask[r, mask.shape[1] - n_real :].all()):
            raise ValueError(f"row {r} of attention_mask has padding after a token; pad on the left")
    return ids, mask
