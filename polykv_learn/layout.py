"""How a compressed layer holds what it keeps: the dense ``(batch, G, slots, d)`` layout (design §4.3).

Rows of a batch and KV heads of a row may keep different numbers of positions (per-row plans of a left-padded
batch; head-wise budgets, AdaKV arXiv:2407.11550). Attention (sdpa, eager) over one key tensor per layer needs
``slots = max`` over its rows and heads of the kept positions: each (row, head) puts its kept positions, ascending,
at the end of its slots; the slots before them hold zeros and are never visible (``visible``, the layer's
``context_visible``), exactly as left padding. Tokens appended later follow in every head. The padding is memory
really allocated (``cache_bytes`` counts it): ``sum over (row, head) of (slots - kept)`` slots per layer.

A layer whose heads differ in slots (``slots_h = max`` over rows of head ``h``'s kept positions) is instead held
per head (:mod:`polykv_learn.ragged`): head ``h`` takes the last ``slots_h`` slots of this layout, so only its rows
are padded to one another (nothing at batch 1). :func:`row_keeps` computes every row's keep sets for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from polykv_learn.layerwise import KeepOrders
from polykv_learn.policies import LayerStats, get_policy, order_positions
from polykv_learn.rows import row_stats

__all__ = ["head_keep_indices", "packed_gather", "packed_layout", "row_keep_positions", "row_keeps"]


def head_keep_indices(order: Tensor, budgets: Sequence[int]) -> list[Tensor]:
    """Each KV head's kept positions, ascending: the first ``min(b_h, n)`` of its keep order.

    order: ``(G, n)`` positions best first (:func:`~polykv_learn.policies.order_positions` of one row, any integer
    dtype); budgets: ``G`` integers >= 0. Returns ``G`` long tensors ``(min(b_h, n),)``; with one budget for every
    head they are the rows of :func:`~polykv_learn.policies.keep_indices`."""
    g, n = order.shape
    if len(budgets) != g:
        raise ValueError(f"got {len(budgets)} head budgets for a layer of {g} KV heads")
    if len(set(budgets)) == 1:  # every head alike: one sort
        return list(order[:, : min(budgets[0], n)].long().sort(dim=-1).values.unbind(0))
    return [order[h, : min(b, n)].long().sort().values for h, b in enumerate(budgets)]


def row_keep_positions(
    heads: Sequence[int], n_real: int, window: int | None, order: Callable[[], Tensor], device: torch.device
) -> tuple[list[Tensor], bool]:
    """What one row of a layer keeps after eviction: per KV head its kept positions among the row's ``n_real`` real
    tokens (ascending), at most ``heads[h]`` each, and whether it keeps all it can (then no keep order is needed).

    A sliding layer (``window`` W) keeps at most ``W - 1`` positions: no later token can see more. ``order()``
    gives the row's ``(G, n_real)`` keep order and is called only when some head keeps less than it can."""
    limit = n_real if window is None else min(n_real, window - 1)
    heads = tuple(min(h, limit) for h in heads)
    if min(heads) < limit:
        return head_keep_indices(order(), heads), False
    return [torch.arange(n_real - limit, n_real, device=device)] * len(heads), True  # the whole row or window


def packed_layout(keeps: Sequence[Sequence[Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
    """``keeps[r][h]``: the kept positions (ascending) of head ``h`` of row ``r`` -> ``index`` (batch, G, slots)
    long, the source position of every slot (0 in padding slots), and ``visible`` (batch, G, slots) bool: the slot
    holds a kept key. Each (row, head) is right-aligned in ``slots = max`` kept."""
    batch, g = len(keeps), len(keeps[0])
    slots = max(k.shape[0] for row in keeps for k in row)
    index = torch.zeros(batch, g, slots, dtype=torch.long, device=device)  # (b, G, slots)
    visible = torch.zeros(batch, g, slots, dtype=torch.bool, device=device)  # (b, G, slots)
    for r, row in enumerate(keeps):
        if len({k.shape[0] for k in row}) == 1:  # every head of the row alike: one write
            kept = row[0].shape[0]
            index[r, :, slots - kept :] = torch.stack(list(row)).to(device)
            visible[r, :, slots - kept :] = True
            continue
        for h, keep in enumerate(row):
            index[r, h, slots - keep.shape[0] :] = keep.to(device)
            visible[r, h, slots - keep.shape[0] :] = True
    return index, visible


def row_keeps(
    stats: LayerStats | None,
    orders: KeepOrders | None,
    policies: Sequence[str],
    budgets: Sequence[int | Sequence[int]],
    n: int,
    g: int,
    window: int | None,
    device: torch.device,
) -> tuple[list[list[Tensor]], bool]:
    """What every row of a layer keeps: ``keeps[r][h]`` the kept positions of head ``h`` of row ``r`` in the padded
    (left-padded batch) layout, ascending, and whether every row keeps all it can. Each row's keep order comes from
    its own statistics cut to its real tokens (``stats``; :func:`~polykv_learn.rows.row_stats`) or, for a layer
    summarised by a layerwise planner, from its ``orders``; ``budgets[r]`` is one budget for all of the row's KV heads
    or one per head."""
    keeps, whole = [], True
    for r in range(len(budgets)):
        rs = row_stats(stats, r) if stats is not None else None  # None: summarised, the orders hold the rows
        n_real = rs.context_length if rs is not None else orders.lengths[r]
        heads = tuple(budgets[r]) if isinstance(budgets[r], Sequence) else (budgets[r],) * g

        def order(r: int = r, rs: LayerStats | None = rs) -> Tensor:  # (G, n_real)
            if rs is None:
                return orders.order(r, policies[r])
            return order_positions(get_policy(policies[r]), rs)[0]

        kept, all_kept = row_keep_positions(heads, n_real, window, order, device)
        keeps.append([keep + (n - n_real) for keep in kept])  # G x (kept_h,), in the padded layout
        whole = whole and all_kept
    return keeps, whole


def packed_gather(keys: Tensor, values: Tensor, index: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
    """The dense layout of ``keys``/``values`` ``(b, G, n, d)`` under :func:`packed_layout`'s ``index``/``visible``
    ``(b, G, slots)``: ``(b, G, slots, d)`` each, zeros in the padding slots."""
    gather = index[..., None].expand(-1, -1, -1, keys.shape[-1])
    keys, values = keys.gather(2, gather), values.gather(2, gather)
    if not bool(visible.all()):  # padding slots hold zeros (never visible)
        keys.masked_fill_(~visible[..., None], 0)
        values.masked_fill_(~visible[..., None], 0)
    return keys, values
