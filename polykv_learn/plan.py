"""Plans: one eviction policy and one budget per layer (design §2), and the budget arithmetic behind them.

A plan ``[(policy_l, b_l)]`` keeps ``b_l`` context positions per KV head at layer ``l``, counting every kept
position (sinks and observation window included). Constructors build the layer-allocation baselines:

- :meth:`Plan.uniform`: the same budget everywhere;
- :meth:`Plan.pyramid`: PyramidKV's linear schedule (Cai et al., arXiv:2406.02069);
- :meth:`Plan.cake`: CAKE's budget proportional to ``entropy^a * variance^b`` of the window attention
  (Qin et al., arXiv:2503.12491), on top of :meth:`Plan.from_allocation`;
- :meth:`Plan.adakv` / :meth:`Plan.adakv_global`: AdaKV's head-wise budgets (Feng et al., arXiv:2407.11550,
  :mod:`polykv_learn.headwise`) within each layer or from one selection over every layer and head.

A plan may also give every KV head of a layer its own budget (``head_budgets``: per layer ``G`` integers summing
to ``G * b_l``); without them every head of layer ``l`` keeps ``b_l``.

Two helpers keep totals exact (:mod:`polykv_learn.budgets`, re-exported here): :func:`project_budgets`
(differentiable almost everywhere, used by the learned allocator) and :func:`round_preserving_sum`
(largest-remainder rounding, used at deployment).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from polykv_learn import headwise
from polykv_learn.budgets import project_budgets, round_preserving_sum
from polykv_learn.policies import LayerStats, check_policy_name, get_policy

__all__ = ["Plan", "project_budgets", "round_preserving_sum"]


def _as_budget(value: Any, layer: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"budget of layer {layer} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"budget of layer {layer} must be a positive integer (>= 1), got {value}")
    return int(value)


def _as_head_budgets(value: Any, budgets: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Checked head budgets: one tuple of ``G`` integers >= 0 per layer, summing to ``G * budgets[l]``."""
    rows = value.tolist() if isinstance(value, Tensor) else value
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        raise ValueError(f"head_budgets must be one list of KV-head budgets per layer, got {value!r}")
    if len(rows) != len(budgets):
        raise ValueError(
            f"head_budgets has {len(rows)} layers but the plan has {len(budgets)}; give one list per layer"
        )
    out = []
    for layer, (row, budget) in enumerate(zip(rows, budgets, strict=True)):
        if isinstance(row, str | bytes) or not isinstance(row, Sequence) or len(row) == 0:
            raise ValueError(f"head budgets of layer {layer} must be a non-empty list of integers (one per KV head)")
        heads = []
        for h, b in enumerate(row):
            if isinstance(b, float) and b.is_integer():
                b = int(b)
            if isinstance(b, bool) or not isinstance(b, Integral) or b < 0:
                raise ValueError(f"budget of KV head {h} of layer {layer} must be an integer >= 0, got {b!r}")
            heads.append(int(b))
        if len(heads) != len(out[0] if out else heads):
            raise ValueError(
                f"head budgets of layer {layer} name {len(heads)} KV heads, layer 0's {len(out[0])}; "
                "every layer has the same KV heads"
            )
        if sum(heads) != len(heads) * budget:
            raise ValueError(
                f"head budgets of layer {layer} sum to {sum(heads)}, but {len(heads)} KV heads x layer budget "
                f"{budget} = {len(heads) * budget}: they must sum to exactly that"
            )
        out.append(tuple(heads))
    return tuple(out)


def _expand_policies(policy_or_list: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
    if isinstance(policy_or_list, str):
        return (policy_or_list,) * num_layers
    policies = tuple(policy_or_list)
    if len(policies) != num_layers:
        raise ValueError(f"got {len(policies)} policies for {num_layers} layers; give one per layer")
    return policies


@dataclass(frozen=True)
class Plan:
    """One policy name and one integer budget (kept positions per KV head) per layer; optionally
    ``head_budgets``: per layer, the budget of each of its ``G`` KV heads (integers >= 0 summing to ``G * b_l``;
    a head keeps the first ``min(b_{l,h}, n)`` positions of its keep order). None: every head keeps ``b_l``."""

    policies: tuple[str, ...]
    budgets: tuple[int, ...]
    head_budgets: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.policies, str):
            raise ValueError(f"policies must be a sequence of names, one per layer, got {self.policies!r}")
        policies = tuple(self.policies)
        budgets = tuple(self.budgets)
        if len(policies) == 0:
            raise ValueError("a plan needs at least one layer (got no policies)")
        if len(policies) != len(budgets):
            raise ValueError(f"plan has {len(policies)} policies but {len(budgets)} budgets; they must match")
        for name in policies:
            if not isinstance(name, str):
                raise ValueError(f"policy names must be strings, got {name!r}")
            check_policy_name(name)
        budgets = tuple(_as_budget(b, layer) for layer, b in enumerate(budgets))
        object.__setattr__(self, "policies", policies)
        object.__setattr__(self, "budgets", budgets)
        if self.head_budgets is not None:
            object.__setattr__(self, "head_budgets", _as_head_budgets(self.head_budgets, budgets))

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return len(self.budgets)

    @property
    def total_budget(self) -> int:
        return sum(self.budgets)

    @property
    def average_budget(self) -> float:
        return self.total_budget / self.num_layers

    @property
    def num_kv_heads(self) -> int | None:
        """KV heads per layer of the head budgets; None without them."""
        return None if self.head_budgets is None else len(self.head_budgets[0])

    def layer_head_budgets(self, layer: int, num_kv_heads: int) -> tuple[int, ...]:
        """The budget of every KV head of ``layer``: its head budgets, or ``b_l`` for each of ``num_kv_heads``."""
        if self.head_budgets is None:
            return (self.budgets[layer],) * num_kv_heads
        return self.head_budgets[layer]

    def kept_per_head(self, context_length: int, windows: Sequence[int | None] | None = None) -> float:
        """Mean over layers and KV heads of the context positions kept for a context of ``context_length``;
        ``windows`` (:func:`polykv_learn.adapter.sliding_windows`): a sliding layer of window W holds at most
        ``W - 1`` of them (what later tokens can see)."""
        caps = _layer_caps(context_length, windows, self.num_layers)
        if self.head_budgets is None:
            return sum(min(b, c) for b, c in zip(self.budgets, caps, strict=True)) / self.num_layers
        return sum(min(b, c) for h, c in zip(self.head_budgets, caps, strict=True) for b in h) / (
            self.num_layers * len(self.head_budgets[0])
        )

    def keeps_all(self, context_length: int, layer: int | None = None) -> bool:
        """Whether every KV head (of ``layer``, or of every layer) keeps the whole context of this length."""
        layers = range(self.num_layers) if layer is None else [layer]
        if self.head_budgets is None:
            return all(self.budgets[i] >= context_length for i in layers)
        return all(b >= context_length for i in layers for b in self.head_budgets[i])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lists(cls, policies: Sequence[str], budgets: Sequence[int]) -> Plan:
        return cls(tuple(policies), tuple(budgets))

    @classmethod
    def uniform(cls, policy: str | Sequence[str], budget: int, num_layers: int) -> Plan:
        """Every layer keeps ``budget`` positions."""
        _check_layers(num_layers)
        return cls(_expand_policies(policy, num_layers), (_as_budget(budget, 0),) * num_layers)

    @classmethod
    def pyramid(
        cls,
        policy: str | Sequence[str],
        budget: int,
        num_layers: int,
        beta: float = 20,
        context_length: int | None = None,
    ) -> Plan:
        """PyramidKV's linear schedule (Cai et al., arXiv:2406.02069, eq. for ``k^l``).

        The top (last) layer gets ``budget / beta``, the bottom (first) ``2 * budget - budget / beta``, linear
        in between, so the mean is ``budget``. Rounded with the largest-remainder rule: integers summing to
        exactly ``num_layers * budget``, non-increasing with depth, each at least 1. With ``context_length``
        ``n`` (the baseline as evaluation and validation run it): nothing is evicted when ``n <= budget``, and
        layer budgets above ``n`` are capped at ``n`` with the excess handed to the other layers.
        """
        _check_layers(num_layers)
        budget = _as_budget(budget, 0)
        if not beta >= 1:
            raise ValueError(f"beta must be >= 1 (beta=1 is uniform), got {beta}")
        if context_length is not None and context_length <= budget:
            return cls.uniform(policy, budget, num_layers)
        top = budget / beta
        bottom = 2 * budget - top
        depth = torch.arange(num_layers, dtype=torch.float64) / max(num_layers - 1, 1)  # (L,)
        values = bottom - (bottom - top) * depth if num_layers > 1 else torch.full((1,), float(budget))
        budgets = round_preserving_sum(values, num_layers * budget, lower=1)
        plan = cls(_expand_policies(policy, num_layers), tuple(budgets))
        if context_length is not None and max(plan.budgets) > context_length:
            return cls.from_allocation(policy, [float(b) for b in plan.budgets], budget, b_max=context_length)
        return plan

    @classmethod
    def from_allocation(
        cls,
        policy_or_list: str | Sequence[str],
        weights: Sequence[float] | Tensor,
        budget: int,
        b_min: int = 1,
        b_max: int | None = None,
    ) -> Plan:
        """Budgets proportional to non-negative ``weights`` (one per layer), clamped into ``[b_min, b_max]``
        with the excess redistributed, as integers summing to exactly ``len(weights) * budget``."""
        w = (
            weights.detach().double().flatten()
            if isinstance(weights, Tensor)
            else torch.tensor([float(x) for x in weights], dtype=torch.float64)
        )
        num_layers = len(w)
        _check_layers(num_layers)
        budget = _as_budget(budget, 0)
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"allocation weights must be finite and non-negative, got {w.tolist()}")
        if not (w > 0).any():
            raise ValueError("allocation weights are all zero: there is nothing to be proportional to")
        if b_min < 1:
            raise ValueError(f"b_min must be >= 1, got {b_min}")
        budgets = round_preserving_sum(w, num_layers * budget, lower=b_min, upper=b_max)
        return cls(_expand_policies(policy_or_list, num_layers), tuple(budgets))

    @classmethod
    def cake(
        cls,
        policy: str | Sequence[str],
        budget: int,
        entropies: Sequence[float] | Tensor,
        variances: Sequence[float] | Tensor,
        a: float = 1.0,
        b: float = 1.0,
        b_min: int = 1,
        b_max: int | None = None,
    ) -> Plan:
        """CAKE-style allocation (Qin et al., arXiv:2503.12491): layer preference ``entropy^a * variance^b``
        of the window attention (spatial dispersion times temporal shift), budgets proportional to it."""
        ent = torch.as_tensor(entropies, dtype=torch.float64).flatten()
        var = torch.as_tensor(variances, dtype=torch.float64).flatten()
        if ent.shape != var.shape:
            raise ValueError(f"got {len(ent)} entropies but {len(var)} variances; give one of each per layer")
        if (ent < 0).any() or (var < 0).any():
            raise ValueError("entropies and variances must be non-negative")
        weights = ent.pow(a) * var.pow(b)  # (L,)
        return cls.from_allocation(policy, weights, budget, b_min=b_min, b_max=b_max)

    # ------------------------------------------------------------------ head-wise budgets (AdaKV)
    def with_head_budgets(self, head_budgets: Sequence[Sequence[int]] | None) -> Plan:
        """This plan with other head budgets (None: none)."""
        return dataclasses.replace(self, head_budgets=head_budgets)

    def with_adakv_heads(self, stats: Sequence[LayerStats], alpha: float = headwise.DEFAULT_ALPHA) -> Plan:
        """This plan's layers and budgets, each layer's ``G * b_l`` shared among its KV heads by AdaKV
        (arXiv:2407.11550, :func:`polykv_learn.headwise.split_heads`): one top over the layer's ``(head, position)``
        scores under the layer's policy, each head at least ``floor(alpha * b_l)``. ``stats``: every layer's
        statistics of one sequence (batch 1, no padding). A layer whose budget covers the context keeps it all."""
        if len(stats) != self.num_layers:
            raise ValueError(f"got statistics of {len(stats)} layers for a plan of {self.num_layers}")

        def keys(layer: int, policy: str) -> tuple[Tensor, Tensor]:
            return headwise.ordered_keys(get_policy(policy), stats[layer])

        return self.with_adakv_heads_from_keys(keys, stats[0].context_length, stats[0].num_kv_heads, alpha)

    def with_adakv_heads_from_keys(
        self, keys: headwise.KeysFn, context_length: int, num_kv_heads: int, alpha: float = headwise.DEFAULT_ALPHA
    ) -> Plan:
        """:meth:`with_adakv_heads` from each layer's :func:`~polykv_learn.headwise.ordered_keys` under its policy
        (``keys(layer, policy)``; what a deployed cache keeps of a layer once its statistics are gone)."""
        heads = headwise.split_heads(self.policies, self.budgets, keys, context_length, num_kv_heads, alpha)
        return self.with_head_budgets(heads)

    @classmethod
    def adakv(
        cls, policy: str, budget: int, stats: Sequence[LayerStats], alpha: float = headwise.DEFAULT_ALPHA
    ) -> Plan:
        """AdaKV (Feng et al., arXiv:2407.11550): the uniform layer budget ``budget``, each layer's ``G * budget``
        shared among its KV heads by one top over their ``policy`` scores, a floor of ``alpha * budget`` per head
        (:meth:`with_adakv_heads`). ``stats``: every layer's statistics of one sequence; ``n <= budget`` keeps
        everything (no head budgets)."""
        plan = cls.uniform(policy, budget, len(stats))
        return plan if stats[0].context_length <= plan.budgets[0] else plan.with_adakv_heads(stats, alpha)

    @classmethod
    def adakv_global(
        cls, policy: str, budget: int, stats: Sequence[LayerStats], alpha: float = headwise.DEFAULT_ALPHA
    ) -> Plan:
        """AdaKV across layers: one top-``L * G * budget`` over every ``(layer, KV head, position)`` of ``policy``'s
        scores, each layer's divided by its largest (protected positions first), after a floor of
        ``f = floor(alpha * budget)`` per head (:func:`polykv_learn.headwise.global_counts`). Layer ``l`` gets its
        share of the selection, rounded to integers with the exact total ``L * budget`` within ``[max(f, 1), n]``,
        and shares it among its heads as :meth:`with_adakv_heads` does with the floor ``f``. ``policy``'s scores
        must be >= 0 (attention-based policies). ``n <= budget`` keeps everything (no head budgets)."""
        _check_layers(len(stats))
        budget = _as_budget(budget, 0)
        floor = headwise.adakv_floor(alpha, budget)
        num_layers, n = len(stats), stats[0].context_length
        if n <= budget:
            return cls.uniform(policy, budget, num_layers)
        keys = [headwise.ordered_keys(get_policy(policy), s) for s in stats]
        counts = headwise.global_counts(keys, budget, floor)  # (L, G)
        g = len(counts[0])
        layers = round_preserving_sum([sum(c) / g for c in counts], num_layers * budget, max(floor, 1), n)
        heads = [tuple(headwise.head_counts(*k, b, floor)) for k, b in zip(keys, layers, strict=True)]
        return cls((policy,) * num_layers, tuple(layers), tuple(heads))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, list]:
        """``policies`` and ``budgets``, and ``head_budgets`` when the plan has them."""
        out: dict[str, list] = {"policies": list(self.policies), "budgets": list(self.budgets)}
        if self.head_budgets is not None:
            out["head_budgets"] = [list(h) for h in self.head_budgets]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        missing = {"policies", "budgets"} - set(data)
        if missing:
            raise ValueError(f"plan dict lacks {sorted(missing)}; expected keys 'policies' and 'budgets'")
        extra = set(data) - {"policies", "budgets", "head_budgets"}
        if extra:
            raise ValueError(f"plan dict has unknown keys {sorted(extra)}; allowed: policies, budgets, head_budgets")
        heads = data.get("head_budgets")
        return cls(tuple(data["policies"]), tuple(data["budgets"]), None if heads is None else tuple(heads))

    # ------------------------------------------------------------------ use
    def check_num_layers(self, num_layers: int) -> None:
        if num_layers != self.num_layers:
            raise ValueError(f"plan has {self.num_layers} layers but the model has {num_layers}")

    def check_dims(self, num_layers: int, num_kv_heads: int) -> None:
        """ValueError unless the plan has ``num_layers`` layers and its head budgets (if any) ``num_kv_heads``."""
        self.check_num_layers(num_layers)
        if self.head_budgets is not None and self.num_kv_heads != num_kv_heads:
            raise ValueError(
                f"plan has head budgets for {self.num_kv_heads} KV heads per layer but the model has {num_kv_heads}"
            )

    def effective_budgets(self, context_length: int, windows: Sequence[int | None] | None = None) -> list[int]:
        """Positions actually kept for a context of ``context_length``: budgets larger than the context mean
        keep all; ``windows`` (:func:`polykv_learn.adapter.sliding_windows`): a sliding layer of window W keeps at
        most ``W - 1`` (design §4.2)."""
        if context_length < 0:
            raise ValueError(f"context_length must be >= 0, got {context_length}")
        caps = _layer_caps(context_length, windows, self.num_layers)
        return [min(b, c) for b, c in zip(self.budgets, caps, strict=True)]

    def __iter__(self):
        return iter(zip(self.policies, self.budgets, strict=True))

    def __len__(self) -> int:
        return self.num_layers

    def __str__(self) -> str:
        width = max(len("policy"), *(len(p) for p in self.policies))
        bw = max(len("budget"), *(len(str(b)) for b in self.budgets))
        heads = self.head_budgets
        lines = [
            f"Plan: {self.num_layers} layers, total budget {self.total_budget} "
            f"(average {self.average_budget:g})" + ("" if heads is None else f", {self.num_kv_heads} KV heads each"),
            f"layer  {'policy':<{width}}  {'budget':>{bw}}" + ("" if heads is None else "  head budgets"),
        ]
        for i, (p, b) in enumerate(self):
            tail = "" if heads is None else "  " + " ".join(str(h) for h in heads[i])
            lines.append(f"{i:>5}  {p:<{width}}  {b:>{bw}}{tail}")
        return "\n".join(lines)


def _check_layers(num_layers: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")


def _layer_caps(context_length: int, windows: Sequence[int | None] | None, num_layers: int) -> list[int]:
    """The most each layer can hold of a context: all of it, or ``W - 1`` positions of a sliding layer."""
    if windows is None:
        return [context_length] * num_layers
    if len(windows) != num_layers:
        raise ValueError(f"got {len(windows)} layer windows for a plan of {num_layers} layers")
    return [context_length if w is None else min(context_length, w - 1) for w in windows]
