"""Reuse of unchanged layers in the simulator's batched probe pass.

Two plans whose key biases agree on layers ``0..l`` give the probe identical hidden states up to the output of
layer ``l`` (the probe's tokens and positions are shared; only the biases differ). So layer ``l`` needs to run once
per *distinct bias prefix* ``0..l``, not once per plan: sensitivity sweeps ("only layer l changes") share every
layer below their own. :func:`prefix_groups` finds the groups; :func:`shared_prefix_layers` runs each decoder
layer on one representative row per group (forward pre-hook: select; forward hook: copy each group's output back
to its plans), so the rest of the transformers forward sees the usual ``P`` rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerGroups:
    """Plans grouped by their bias prefix up to one layer: ``rep`` (U,) one plan per group (its first),
    ``inverse`` (P,) each plan's group, ``U <= P``."""

    rep: Tensor
    inverse: Tensor

    @property
    def shared(self) -> bool:
        return self.rep.numel() < self.inverse.numel()


def prefix_groups(biases: Sequence[Tensor]) -> list[LayerGroups]:
    """Per layer, the plans grouped by equal biases on that layer and every layer below (biases: (P, G, n) each)."""
    num_plans = biases[0].shape[0]
    previous = torch.zeros(num_plans, dtype=torch.long, device=biases[0].device)
    groups = []
    for bias in biases:
        if bias.shape[0] != num_plans:
            raise ValueError(f"every layer's bias needs {num_plans} plans, got {tuple(bias.shape)}")
        rows = torch.cat([previous[:, None].float(), bias.detach().float().reshape(num_plans, -1)], dim=1)
        _, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (P,)
        count = int(inverse.max()) + 1
        plan_ids = torch.arange(num_plans, device=inverse.device)
        rep = torch.full((count,), num_plans, dtype=torch.long, device=inverse.device)
        rep = rep.scatter_reduce(0, inverse, plan_ids, reduce="amin")  # first plan of each group
        groups.append(LayerGroups(rep=rep, inverse=inverse))
        previous = inverse
    return groups


def representative_biases(biases: Sequence[Tensor], groups: Sequence[LayerGroups]) -> list[Tensor]:
    """What each layer's cache must hold under :func:`shared_prefix_layers`: the representatives' biases
    ``(U_l, G, n)`` where layer ``l`` is shared, the plans' own ``(P, G, n)`` elsewhere (that layer runs every plan)."""
    return [b.index_select(0, g.rep) if g.shared else b for b, g in zip(biases, groups, strict=True)]


def _select_rows(value: object, rep: Tensor, num_plans: int) -> object:
    """``value`` with its batch rows ``rep`` when it is a batch-first tensor of ``num_plans`` rows (or a tuple of
    them: RoPE's cos/sin); anything else unchanged."""
    if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[0] == num_plans:
        return value.index_select(0, rep)
    if isinstance(value, tuple):
        return tuple(_select_rows(item, rep, num_plans) for item in value)
    return value


@contextmanager
def shared_prefix_layers(layers: Sequence[nn.Module], groups: Sequence[LayerGroups]) -> Iterator[None]:
    """While active, decoder layer ``l`` runs on ``groups[l].rep`` only and its output is copied back to every plan
    of each group; layers without shared prefixes are left alone. Each layer's cache must hold
    :func:`representative_biases`."""
    if len(layers) != len(groups):
        raise ValueError(f"need one group set per decoder layer ({len(layers)}), got {len(groups)}")
    handles = []
    for layer, group in zip(layers, groups, strict=True):
        if not group.shared:
            continue
        num_plans = group.inverse.numel()

        def pre_hook(module, args, kwargs, rep=group.rep, num_plans=num_plans):
            args = tuple(_select_rows(a, rep, num_plans) for a in args)
            kwargs = {key: _select_rows(value, rep, num_plans) for key, value in kwargs.items()}
            return args, kwargs

        def post_hook(module, args, kwargs, output, inverse=group.inverse):
            if isinstance(output, tuple):  # older decoder layers return (hidden_states, ...)
                return (output[0].index_select(0, inverse), *output[1:])
            return output.index_select(0, inverse)  # (U, m, D) -> (P, m, D)

        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
