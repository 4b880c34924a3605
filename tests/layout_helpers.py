"""Checks of a compressed cache's physical layout (dense or ragged per layer) and of its byte accounting."""

from polykv_learn.cache import cache_bytes, padding_bytes


def assert_batch_layout(cache, g: int, new: int, lengths) -> None:
    """Each layer of a compressed batch (rows of ``lengths`` real tokens, full-attention layers) holds head ``h`` in
    ``slots_h = max_r min(b_rh, n_r)`` context slots (row ``r``'s kept
    keys visible at their end, zeros before them) plus ``new`` tokens: ragged (one tensor per head) where the heads'
    slots differ, dense ``(b, G, slots, d)`` where they do not; cache_bytes/padding_bytes count exactly that."""
    total = padding = 0
    for i, layer in enumerate(cache.layers):
        heads = [
            [min(b, n) for b in p.layer_head_budgets(i, g)] for p, n in zip(cache.applied_plans, lengths, strict=True)
        ]
        slots = [max(row[h] for row in heads) for h in range(g)]
        assert (layer.ragged is not None) == (len(set(slots)) > 1), i
        keys, values, visible, _ = layer.padded()  # (b, G, S + new, d), (b, G, S)
        if layer.ragged is not None:
            assert layer.keys is None and [k.shape[2] for k in layer.ragged.keys] == [s + new for s in slots]
        width = max(slots)
        assert keys.shape[2] == width + new and visible.shape[-1] == width
        for r, row in enumerate(heads):
            assert visible[r].sum(dim=-1).tolist() == list(row)
            for h in range(g):
                assert visible[r, h, width - row[h] :].all() and not keys[r, h, : width - row[h]].any()
                assert not values[r, h, : width - row[h]].any()
        d, itemsize = keys.shape[-1], keys.element_size()
        total += sum(s + new for s in slots) * len(heads) * d * 2 * itemsize
        padding += sum(s - row[h] for row in heads for h, s in enumerate(slots)) * d * 2 * itemsize
    assert cache_bytes(cache) == total and padding_bytes(cache) == padding
