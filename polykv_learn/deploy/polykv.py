"""``PolyKV``: a trained router + budget allocator, ready to compress a model's cache inside ``generate``.

polykv = PolyKV.from_pretrained("checkpoints/smollm2-135m")
with polykv.apply(model, budget=128):            # adaptive: plan decided on each input at the end of prefill
    model.generate(input_ids, max_new_tokens=64)
cache = polykv.make_cache(model, budget=128, mode="static")   # one fixed plan, evicts as each layer finishes
model.generate(input_ids, past_key_values=cache)
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache
from polykv_learn.capture import CaptureOptions
from polykv_learn.deploy.artifact import read_artifact, write_artifact
from polykv_learn.features import FeatureScaler, layer_features
from polykv_learn.learn.allocator import BudgetAllocator
from polykv_learn.learn.router import GBDTRouter, MLPRouter
from polykv_learn.plan import Plan
from polykv_learn.policies import LayerStats, get_policy

MODES = ("adaptive", "static")


class PolyKV:
    """A frozen router/allocator pair for one model geometry (see the module docstring)."""

    def __init__(self, config: dict[str, Any], tensors: dict[str, Tensor]):
        self.config = config
        self.tensors = tensors
        self.policies: list[str] = list(config["policies"])
        self.overlap_policies: list[str] = list(config["overlap_policies"])
        self.feature_names: list[str] = list(config["feature_names"])
        self.scaler = FeatureScaler.from_dict(config["scaler"])
        self.b_min = int(config["b_min"])
        self.budgets: list[int] = [int(b) for b in config["budgets"]]
        cap = config["capture"]
        self.capture = CaptureOptions(
            window=cap["window"],
            future=cap["future"],
            chunk=cap["chunk"],
            accumulate=any(get_policy(p).needs_accumulated_attn for p in self.policies),
        )
        num_features = len(self.feature_names)
        r, a = config["router"], config["allocator"]
        self.router = MLPRouter(
            num_features, self.policies, hidden=r["hidden"], num_hidden_layers=r["num_hidden_layers"]
        )
        self.router.load_state_dict(_prefixed(tensors, "router."))
        self.allocator = BudgetAllocator(num_features, hidden=a["hidden"], num_hidden_layers=a["num_hidden_layers"])
        self.allocator.load_state_dict(_prefixed(tensors, "allocator."))
        self.gbdt: GBDTRouter | None = None
        if r["type"] == "gbdt":
            arrays = {k: v.numpy() for k, v in _prefixed(tensors, "gbdt.").items()}
            self.gbdt = GBDTRouter.from_state(arrays, r["gbdt"])
        self.calibration = tensors["calibration_features"]  # (K, L, F) unscaled
        self.router.eval()
        self.allocator.eval()

    # --- persistence ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PolyKV:
        config, tensors = read_artifact(directory)
        try:
            return cls(config, tensors)
        except (KeyError, RuntimeError, TypeError) as err:
            raise ValueError(f"corrupt artifact {directory}: {err}") from err

    def save_pretrained(self, directory: str | Path) -> Path:
        config = {k: v for k, v in self.config.items() if k != "format"}
        return write_artifact(directory, config, self.tensors)

    @property
    def model_fingerprint(self) -> dict[str, Any]:
        return dict(self.config["model"])

    def check_model(self, model: PreTrainedModel) -> None:
        """Raise if ``model``'s attention geometry differs from the one this router was trained for."""
        dims = adapter.model_dims(model).to_dict()
        trained = self.model_fingerprint
        keys = ("num_layers", "num_kv_heads", "head_dim")
        if any(dims[k] != trained[k] for k in keys):

            def show(d: dict[str, Any]) -> str:
                return f"{d['name']} (layers={d['num_layers']}, kv_heads={d['num_kv_heads']}, head_dim={d['head_dim']})"

            raise ValueError(f"this router was trained for {show(trained)} but the model is {show(dims)}")

    # --- plans ---------------------------------------------------------------------------------------------------
    def _check_budget(self, budget: int) -> int:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
            raise ValueError(f"budget must be a positive integer (average kept positions per layer), got {budget!r}")
        return int(budget)

    def features(self, stats: Sequence[LayerStats], budget: int) -> Tensor:
        """Raw layer signals (L, F) of a prefill at ``budget`` (batch element 0)."""
        n = stats[0].context_length
        return torch.cat([layer_features(s, min(budget, n), self.overlap_policies, len(stats))[:1] for s in stats])

    @torch.no_grad()
    def plan_from_features(self, features: Tensor, budget: int, context_length: int) -> Plan:
        """The hard plan for raw features (L, F): router's arg-max policy and the allocator's integer budgets."""
        budget = self._check_budget(budget)
        scaled = self.scaler.transform(features.detach().float().cpu())  # router and allocator live on the CPU
        if self.gbdt is not None:
            policies = self.gbdt.predict(scaled.numpy())
        else:
            policies = self.router.hard_choice(scaled)
        if context_length <= budget:
            return Plan.from_lists(policies, [budget] * len(policies))
        budgets = self.allocator.integer_budgets(scaled, budget, context_length, min(self.b_min, budget))
        return Plan.from_lists(policies, budgets)

    def plan_for_stats(self, stats: Sequence[LayerStats], budget: int) -> Plan:
        return self.plan_from_features(self.features(stats, budget), budget, stats[0].context_length)

    @torch.no_grad()
    def plan_for(self, model: PreTrainedModel, input_ids: Tensor, budget: int) -> Plan:
        """The plan adaptive mode would apply to ``input_ids`` (one sequence), for inspection and the simulator."""
        self.check_model(model)
        cache = CompressedCache(model, capture=self.capture)
        adapter.forward(model, input_ids[:1] if input_ids.ndim == 2 else input_ids[None], cache, logits_to_keep=1)
        return self.plan_for_stats(cache.layer_stats, budget)

    def static_plan(self, budget: int) -> Plan:
        """One fixed plan per budget, from the calibration features (the nearest budget of the grid)."""
        budget = self._check_budget(budget)
        k = min(range(len(self.budgets)), key=lambda i: abs(np.log(self.budgets[i] / budget)))
        max_n = int(self.model_fingerprint["max_positions"])
        return self.plan_from_features(self.calibration[k], budget, max_n)

    # --- deployment ----------------------------------------------------------------------------------------------
    def make_cache(self, model: PreTrainedModel, budget: int, mode: str = "adaptive") -> CompressedCache:
        """A fresh cache for one ``generate`` call; ``mode`` is ``adaptive`` or ``static``."""
        self.check_model(model)
        budget = self._check_budget(budget)
        if mode == "static":
            return CompressedCache(model, plan=self.static_plan(budget))
        if mode != "adaptive":
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

        def planner(stats: list[LayerStats]) -> Plan:
            plan = self.plan_for_stats(stats, budget)
            owner = cache_ref()
            if owner is not None:
                owner.last_plan = plan
            return plan

        cache = CompressedCache(model, planner=planner, capture=self.capture)
        cache_ref = weakref.ref(cache)  # not the cache itself: cache -> planner -> cache would be a reference cycle
        return cache

    @contextlib.contextmanager
    def apply(self, model: PreTrainedModel, budget: int, mode: str = "adaptive") -> Iterator[None]:
        """Within the block, ``model.generate`` (without an explicit cache) uses a fresh compressed cache."""
        from polykv_learn.deploy.compress import compress

        self.make_cache(model, budget, mode)  # validate now, not at the first generate
        with compress(model, cache_factory=lambda: self.make_cache(model, budget, mode)):
            yield


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
