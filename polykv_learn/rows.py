"""One row of a batch's statistics, alone: what a prefill of that sequence by itself records (design §4.3).

Batches are left-padded; each row is compressed as if it ran alone, from its own statistics cut to its real tokens.
:mod:`polykv_learn.cache` re-exports :func:`row_stats`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polykv_learn import adapter
from polykv_learn.plan import Plan
from polykv_learn.policies import LayerStats

__all__ = ["plans_per_row", "real_keys", "real_length", "row_stats"]


def row_stats(stats: LayerStats, row: int) -> LayerStats:
    """The statistics of batch row ``row`` alone, cut to its real (non-padding) positions: batch 1, ``n`` = the
    row's own length, every position valid; what a prefill of that sequence by itself records, up to float
    rounding. Views, not copies, computed once per row (``LayerStats.memo``); one unpadded sequence gives
    ``stats`` itself. Raises ValueError for a row without real tokens or with padding after a real token."""
    batch = stats.valid.shape[0]
    if not 0 <= row < batch:
        raise IndexError(f"row {row} is outside the batch of {batch}")
    if batch == 1 and bool(stats.valid.all()):
        return stats
    return stats.memo(("row_stats", row), lambda: _cut_row(stats, row))


def real_length(valid: Tensor, row: int) -> int:
    """Real tokens of ``valid`` (n,) bool, which must be a suffix (left padding)."""
    n_real = int(valid.sum())
    if n_real == 0:
        raise ValueError(f"row {row} of the batch has no real token (its attention_mask is all zeros)")
    if not bool(valid[valid.shape[0] - n_real :].all()):
        raise ValueError(
            f"row {row} of the batch has padding after a real token; CompressedCache needs left padding "
            "(tokenizer.padding_side = 'left')"
        )
    return n_real


def _cut_row(stats: LayerStats, row: int) -> LayerStats:
    n_real = real_length(stats.valid[row], row)
    pad = stats.context_length - n_real
    w = min(stats.window_size, n_real)  # a single sequence shorter than the window uses all of it as the window
    r = slice(row, row + 1)
    acc, rec = stats.accumulated_attn, stats.reconstruct_attn
    return LayerStats(
        keys=stats.keys[r, :, pad:],  # (1, G, n_real, d)
        values=stats.values[r, :, pad:],  # (1, G, n_real, d)
        window_queries=stats.window_queries[r, :, -w:],  # (1, H, w, d)
        window_attn=stats.window_attn[r, :, -w:, pad:],  # (1, H, w, n_real): padding keys had weight 0
        valid=stats.valid[r, pad:],  # (1, n_real) all True
        positions=stats.positions[r, pad:],  # (1, n_real)
        scaling=stats.scaling,
        window_cos=stats.window_cos[r, -w:],  # (1, w, d)
        window_sin=stats.window_sin[r, -w:],
        future_cos=stats.future_cos[r],  # (1, T, d)
        future_sin=stats.future_sin[r],
        accumulated_attn=None if acc is None else acc[r, :, pad:],  # (1, H, n_real): padding queries added 0
        reconstruct_attn=None if rec is None else rec[r, :, pad:],  # (1, G, n_real)
        layer_idx=stats.layer_idx,
        sliding_window=stats.sliding_window,
    )


def real_keys(call: adapter.AttentionCall, n: int) -> Tensor:
    """``(b, n)`` bool: the prefill keys the last query sees, the real (non-padding) ones. Without a mask
    (transformers skipped it: plain causal, ``AttentionCall.visible``) every key, without building the ``n x n``
    visibility; else the last row of the visibility, copied (a view would keep the whole mask alive in every layer's
    statistics). A sliding layer's last query sees only its window: there each key's own query tells (the diagonal,
    True unless the position is padding)."""
    if call.mask is None:
        return torch.ones(call.key.shape[0], n, dtype=torch.bool, device=call.key.device)
    if call.sliding_window is not None:
        return call.visible(n).diagonal(dim1=1, dim2=2).clone()
    return call.visible(n)[:, -1, :].clone()


def plans_per_row(plan: Plan | Sequence[Plan], batch: int) -> list[Plan]:
    """One plan per batch row: a single ``Plan`` applies to every row."""
    if isinstance(plan, Plan):
        return [plan] * batch
    if isinstance(plan, Sequence) and all(isinstance(p, Plan) for p in plan):
        if len(plan) != batch:
            raise ValueError(
                f"got {len(plan)} plans for a batch of {batch} rows; give one Plan (for every row) or one per row"
            )
        return list(plan)
    raise TypeError(f"a plan must be a Plan or a list of Plans (one per batch row), got {type(plan).__name__}")
