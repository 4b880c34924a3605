"""``LearnedPlanner``: the one place a learned router and allocator turn layer signals into a hard plan.

Validation during ``fit`` and deployment (``PolyKV``) both call :meth:`LearnedPlanner.plan`, so what validation
measures is what ships. The planner holds

- the feature standardisation (:class:`~polykv_learn.features.FeatureScaler`),
- the router: an :class:`~polykv_learn.planner.router.MLPRouter` (arg-max policy), or a
  :class:`~polykv_learn.planner.router.GBDTRouter` that replaces it when given,
- the :class:`~polykv_learn.planner.allocator.BudgetAllocator` (integer budgets with the exact total),
- ``b_min``, the smallest budget a layer gets (``min(b_min, budget)``, so a tiny average budget stays feasible),
- optionally a :class:`~polykv_learn.planner.head_allocator.HeadAllocator` with its own scaler of the per-head signals
  (:mod:`polykv_learn.head_features`): each layer's ``G * b_l`` is then shared among its KV heads (head budgets).

``state()`` gives the artifact entries (``policies``, ``scaler``, ``router``, ``allocator``, ``b_min``; with a head
allocator ``head_allocation: learned``, ``head_allocator`` and ``head_scaler``) and the tensors (``router.*``,
``allocator.*``, ``gbdt.*``, ``head_allocator.*``); ``from_state(config, tensors)`` rebuilds the planner from them.
The router and allocator are used as they are (not copied): a planner over a learner's modules follows training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polykv_learn.features import FeatureScaler
from polykv_learn.head_features import HEAD_FEATURE_NAMES
from polykv_learn.plan import Plan
from polykv_learn.planner.allocator import BudgetAllocator
from polykv_learn.planner.head_allocator import HeadAllocator
from polykv_learn.planner.router import GBDTRouter, MLPRouter

__all__ = ["LearnedPlanner"]


def check_budget(budget: Any) -> int:
    """``budget`` as an int, or a one-line ValueError when it is not a positive integer."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer (average kept positions per layer), got {budget!r}")
    return int(budget)


class LearnedPlanner:
    """Router + allocator + feature scaler (+ optional GBDT router) -> :class:`~polykv_learn.plan.Plan`."""

    def __init__(
        self,
        policies: Sequence[str],
        scaler: FeatureScaler,
        router: MLPRouter,
        allocator: BudgetAllocator,
        b_min: int,
        gbdt: GBDTRouter | None = None,
        head_allocator: HeadAllocator | None = None,
        head_scaler: FeatureScaler | None = None,
    ) -> None:
        if list(router.policies) != list(policies):
            raise ValueError(f"the router routes to {list(router.policies)}, the planner to {list(policies)}")
        self.policies = list(policies)
        self.scaler = scaler
        self.router = router
        self.allocator = allocator
        self.b_min = int(b_min)
        self.gbdt = gbdt
        if (head_allocator is None) != (head_scaler is None):
            raise ValueError("a head allocator needs its head-feature scaler, and a head scaler its head allocator")
        self.head_allocator = head_allocator
        self.head_scaler = head_scaler

    def scale(self, features: Tensor) -> Tensor:
        """Raw features ``(..., F)`` -> standardised, on the router's device, float32."""
        device = next(self.allocator.parameters()).device
        return self.scaler.transform(features.detach().float().to(device))

    @torch.no_grad()
    def choose_policies(self, scaled: Tensor) -> list[str]:
        """The routed policy of each layer of standardised features ``(L, F)``."""
        if self.gbdt is not None:
            return self.gbdt.predict(scaled.cpu().numpy())
        return self.router.hard_choice(scaled)

    @torch.no_grad()
    def plan(self, features: Tensor, budget: int, context_length: int, head_features: Tensor | None = None) -> Plan:
        """The hard plan for raw layer features ``(L, F)`` of a context of ``context_length`` tokens.

        Budgets sum to exactly ``L * budget`` within ``[min(b_min, budget), n]``; when ``n <= budget`` nothing
        is evicted (every layer gets ``budget``). With ``head_features`` (raw per-head signals ``(L, G, Fh)``; the
        planner must have a head allocator) every layer's ``G * b_l`` is shared among its KV heads
        (:meth:`head_budgets`); without them every head keeps ``b_l``."""
        budget = check_budget(budget)
        if features.ndim != 2:
            raise ValueError(f"plan expects features of shape (L, F), got {tuple(features.shape)}")
        if head_features is not None and self.head_allocator is None:
            raise ValueError("this planner has no head allocator: plan takes no per-head features")
        scaled = self.scale(features)  # (L, F)
        policies = self.choose_policies(scaled)
        if context_length <= budget:
            return Plan.from_lists(policies, [budget] * len(policies))
        b_min = min(self.b_min, budget)
        budgets = self.allocator.integer_budgets(scaled, budget, context_length, b_min)
        plan = Plan.from_lists(policies, budgets)
        if head_features is None:
            return plan
        return plan.with_head_budgets(self.head_budgets(head_features, budgets, context_length, b_min))

    @torch.no_grad()
    def head_budgets(
        self, head_features: Tensor, layer_budgets: list[int], context_length: int, b_min: int
    ) -> list[tuple[int, ...]]:
        """Integer head budgets of the head allocator for raw per-head signals ``(L, G, Fh)`` and integer layer
        budgets: per layer ``G`` integers summing to ``G * b_l`` in ``[min(b_min, b_l), n]``."""
        if self.head_allocator is None or self.head_scaler is None:
            raise ValueError("this planner has no head allocator")
        device = next(self.head_allocator.parameters()).device
        scaled = self.head_scaler.transform(head_features.detach().float().to(device))  # (L, G, Fh)
        return self.head_allocator.integer_budgets(scaled, layer_budgets, context_length, b_min)

    # --- persistence -------------------------------------------------------------------------------------------
    def state(self, router_type: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Artifact entries and tensors of this planner; ``router_type`` is ``mlp`` or ``gbdt``."""
        if (router_type == "gbdt") != (self.gbdt is not None):
            raise ValueError(f"router type {router_type!r} does not match the planner (gbdt: {self.gbdt is not None})")
        router: dict[str, Any] = {
            "type": router_type,
            "hidden": self.router.hidden,
            "num_hidden_layers": self.router.num_hidden_layers,
        }
        tensors = {f"router.{k}": v for k, v in self.router.state_dict().items()}
        tensors.update({f"allocator.{k}": v for k, v in self.allocator.state_dict().items()})
        if self.gbdt is not None:
            arrays, meta = self.gbdt.to_state()
            tensors.update({f"gbdt.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
            router["gbdt"] = meta
        config = {
            "policies": list(self.policies),
            "scaler": self.scaler.to_dict(),
            "router": router,
            "allocator": {
                "hidden": self.allocator.hidden,
                "num_hidden_layers": self.allocator.num_hidden_layers,
                **({} if self.allocator.prior is None else {"prior": self.allocator.prior}),
            },
            "b_min": self.b_min,
        }
        if self.head_allocator is not None:
            tensors.update({f"head_allocator.{k}": v for k, v in self.head_allocator.state_dict().items()})
            config["head_allocation"] = "learned"
            config["head_allocator"] = {
                "hidden": self.head_allocator.hidden,
                "num_hidden_layers": self.head_allocator.num_hidden_layers,
                "feature_names": list(HEAD_FEATURE_NAMES),
            }
            config["head_scaler"] = self.head_scaler.to_dict()
        return config, tensors

    @classmethod
    def from_state(cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> LearnedPlanner:
        """Rebuild from an artifact's ``polykv.json`` entries and tensors (evaluation mode, on the CPU)."""
        policies = list(config["policies"])
        num_features = len(config["feature_names"])
        r, a = config["router"], config["allocator"]
        router = MLPRouter(num_features, policies, hidden=r["hidden"], num_hidden_layers=r["num_hidden_layers"])
        router.load_state_dict(_prefixed(tensors, "router."))
        allocator = BudgetAllocator(
            num_features, hidden=a["hidden"], num_hidden_layers=a["num_hidden_layers"], prior=a.get("prior")
        )
        allocator.load_state_dict(_prefixed(tensors, "allocator."))
        gbdt = None
        if r["type"] == "gbdt":
            arrays = {k: v.numpy() for k, v in _prefixed(tensors, "gbdt.").items()}
            gbdt = GBDTRouter.from_state(arrays, r["gbdt"])
        router.eval()
        allocator.eval()
        head_allocator = head_scaler = None
        if "head_allocator" in config:
            h = config["head_allocator"]
            head_allocator = HeadAllocator(len(h["feature_names"]), h["hidden"], h["num_hidden_layers"])
            head_allocator.load_state_dict(_prefixed(tensors, "head_allocator."))
            head_allocator.eval()
            head_scaler = FeatureScaler.from_dict(config["head_scaler"])
        scaler = FeatureScaler.from_dict(config["scaler"])
        return cls(policies, scaler, router, allocator, int(config["b_min"]), gbdt, head_allocator, head_scaler)


def _prefixed(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
