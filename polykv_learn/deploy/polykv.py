"""``PolyKV``: a trained router + budget allocator, ready to compress a model's cache inside ``generate``.

polykv = PolyKV.from_pretrained("checkpoints/smollm2-135m")
with polykv.apply(model, budget=128):            # adaptive: plan decided on each input at the end of prefill
    model.generate(input_ids, max_new_tokens=64)
cache = polykv.make_cache(model, budget=128, mode="static")   # one fixed plan, evicts as each layer finishes
model.generate(input_ids, cache=cache)                       # one cache per generate call

Static plans: an artifact with calibrated plans (``polykv-learn calibrate --artifact``, :meth:`with_calibrated_plans`)
serves the calibrated plan of the grid budget nearest to B, rescaled exactly to ``L * B``; without them, the router
applied to the averaged calibration features (:meth:`static_plan`).

Learned head-wise budgets (``head_allocation="learned"``, adaptive mode only; artifacts fitted with
``model.head_allocation: learned``): the planner's head allocator shares each layer's ``G * b_l`` among its KV heads
from per-KV-head signals (:mod:`polykv_learn.deploy.learned_heads`).

Head-wise budgets (``head_allocation="adakv"``, adaptive mode only): the learned layer plan, then AdaKV's split of
each layer's ``G * b_l`` among its KV heads (arXiv:2407.11550, :meth:`Plan.with_adakv_heads`) by the layer's own
routed policy. The layer budgets exist only after the last layer, so each layer keeps, for its rows' candidate
policies, the ``(protected, score)`` keys along their keep orders (``(G, n)`` each, :func:`headwise.ordered_keys`)
until the plan; the split is then the one of the row's own statistics.

In a left-padded batch (with its ``attention_mask``) every row of an adaptive cache gets its own plan, the one it
would get alone (``cache.applied_plans``; ``plan_for`` of a (batch, n) input lists them).

An adaptive cache plans with :meth:`PolyKV.layerwise_planner`: as soon as a layer's prefill attention is done, its
signals (at the cache's budget) are taken, the router picks its policy for each row from them, the keep orders of
those policies are computed (H2O's accumulated attention only if a row needs it) and the statistics are dropped, so
the cache holds little more than the full cache's keys/values until the plan is decided. A router that may route to
KVzip runs its reconstruction pass after the last layer, and only if some row of some layer may get KVzip; those
layers keep their statistics until then. The plan itself is the one
from every layer's signals (:meth:`plans_for_stats`). A router with an allocation prior (``kvzip_global``: a signal
of every layer's KVzip scores at once) always runs the pass and plans from every layer's statistics after it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel

from polykv_learn import adapter, headwise
from polykv_learn.budgets import rescale_budgets
from polykv_learn.cache import CompressedCache, row_stats
from polykv_learn.capture import CaptureOptions, scope_options
from polykv_learn.deploy import learned_heads
from polykv_learn.deploy.artifact import FORMAT, read_artifact, validate_config, write_artifact
from polykv_learn.deploy.inputs import check_inputs, one_sequence
from polykv_learn.features import layer_features
from polykv_learn.kvzip_global import normalised_scores, prior_column
from polykv_learn.layerwise import LayerwisePlanner
from polykv_learn.plan import Plan
from polykv_learn.planner import LearnedPlanner, check_budget
from polykv_learn.policies import LayerStats, get_policy

MODES = ("adaptive", "static")
#: how an adaptive cache shares each layer's budget among its KV heads: equally, AdaKV's split, or the artifact's
#: learned head allocator
HEAD_ALLOCATIONS = ("none", "adakv", "learned")

#: one layer's part of an adaptive plan: raw signals (batch, F) and the real context length of every row
LayerSummary = tuple[Tensor, tuple[int, ...]]
#: with head allocation: the layer's summary and, per row, each candidate policy's ordered keys ``(G, n_row)`` x2
HeadSummary = tuple[LayerSummary, tuple[dict[str, tuple[Tensor, Tensor]], ...]]

#: an MLP router's policies whose logit is within this much (relative, ``tol * (1 + |best|)``) of a row's best are
#: all candidates: the plan routes every layer in one batch, whose float rounding may differ from one layer's rows
ROUTER_TIE_TOLERANCE = 1e-3


class PolyKV:
    """A frozen router/allocator pair for one model geometry (see the module docstring)."""

    def __init__(self, config: dict[str, Any], tensors: dict[str, Tensor]):
        self.config = config
        self.tensors = tensors
        self.policies: list[str] = list(config["policies"])
        self.overlap_policies: list[str] = list(config["overlap_policies"])
        self.feature_names: list[str] = list(config["feature_names"])
        self.allocation_prior: str | None = config.get("allocation_prior")  # a column across layers (kvzip_global)
        self.b_min = int(config["b_min"])
        self.budgets: list[int] = [int(b) for b in config["budgets"]]
        cap = config["capture"]
        used = [get_policy(p) for p in {*self.policies, *self.overlap_policies}]  # routed, or read by a feature
        self.capture = CaptureOptions(
            window=cap["window"],
            future=cap["future"],
            chunk=cap["chunk"],
            accumulate=any(p.needs_accumulated_attn for p in used),
            reconstruct=any(p.needs_reconstruct_attn for p in used) or self.allocation_prior is not None,
            **scope_options(cap),  # absent (every artifact made before the option): scope "full"
        )
        self.planner = LearnedPlanner.from_state(config, tensors)  # the same planner validation used in fit
        #: the head allocation the router was fitted for (``none``, ``learned``: it has a head allocator, ``adakv``)
        self.head_allocation: str = config.get("head_allocation", "none")
        self.calibration = tensors["calibration_features"]  # (K, L, F) unscaled
        section = config.get("calibrated")  # validated on load (artifact format 2)
        self.calibrated_plans: dict[int, Plan] = {}
        self.calibrated_b_min = self.b_min
        if section:
            self.calibrated_b_min = int(section["b_min"])
            for key in sorted(section["plans"], key=int):
                plan = section["plans"][key]
                self.calibrated_plans[int(key)] = Plan.from_lists(plan["policies"], plan["budgets"])

    def check_head_allocation(self, head_allocation: str) -> None:
        """One of :data:`HEAD_ALLOCATIONS`, and ``learned`` only with an artifact that has a head allocator."""
        _check_head_allocation(head_allocation)
        if head_allocation == "learned":
            learned_heads.check_learned(self)

    # --- persistence ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PolyKV:
        config, tensors = read_artifact(directory)
        try:
            return cls(config, tensors)
        except (KeyError, RuntimeError, TypeError) as err:
            raise ValueError(f"corrupt artifact {directory}: {err}") from err

    def with_calibrated_plans(
        self, plans: dict[int, Plan], context_length: int, b_min: int, info: dict[str, Any] | None = None
    ) -> PolyKV:
        """A copy of this artifact whose static plans are ``plans`` (average budget B -> plan with ``L`` layers,
        budgets in ``[min(b_min, B), context_length]`` summing to ``L * B``; checked here, as on load)."""
        section = {
            "context_length": int(context_length),
            "b_min": int(b_min),
            "plans": {str(b): {"policies": list(p.policies), "budgets": list(p.budgets)} for b, p in plans.items()},
            "calibration": dict(info or {}),
        }
        config = {**{k: v for k, v in self.config.items() if k != "format"}, "calibrated": section}
        validate_config({"format": FORMAT, **config}, self.tensors, "(calibrated copy)", problem="invalid")
        return PolyKV({"format": FORMAT, **config}, self.tensors)

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
    def features(self, stats: Sequence[LayerStats], budget: int) -> Tensor:
        """Raw layer signals (L, F) of one sequence's prefill at ``budget``; a left-padded one-row batch is cut to
        its real tokens first. For a batch, take each row's statistics with :func:`~polykv_learn.cache.row_stats`
        (or use :meth:`plans_for_stats`)."""
        stats = one_sequence(stats, "features")
        n = stats[0].context_length
        features = torch.cat([layer_features(s, min(budget, n), self.overlap_policies, len(stats)) for s in stats])
        if self.allocation_prior is None:
            return features  # (L, F)
        column = prior_column([normalised_scores(s) for s in stats], min(budget, n))  # (L,) across layers
        return torch.cat([features, column[:, None].to(features)], dim=1)  # (L, F)

    @torch.no_grad()
    def plan_from_features(self, features: Tensor, budget: int, context_length: int) -> Plan:
        """The hard plan for raw features (L, F): router's arg-max policy and the allocator's integer budgets
        (:meth:`polykv_learn.planner.LearnedPlanner.plan`)."""
        return self.planner.plan(features, budget, context_length)

    def plan_for_stats(
        self,
        stats: Sequence[LayerStats],
        budget: int,
        head_allocation: str = "none",
        alpha: float = headwise.DEFAULT_ALPHA,
    ) -> Plan:
        """The adaptive plan of one sequence's prefill statistics (batch 1; for a batch see :meth:`plans_for_stats`),
        sized from its real (non-padding) context length. ``head_allocation="adakv"``: then AdaKV's split of every
        layer among its KV heads under the layer's policy (:meth:`Plan.with_adakv_heads`, floor ``alpha * b_l``;
        none when ``n <= budget``: nothing is evicted); ``"learned"``: the artifact's head allocator's split."""
        self.check_head_allocation(head_allocation)
        stats = one_sequence(stats, "plan_for_stats")
        n = stats[0].context_length
        if head_allocation == "learned":  # the planner's head allocator on the per-head signals
            heads = learned_heads.sequence_head_features(stats, budget)  # (L, G, Fh)
            return self.planner.plan(self.features(stats, budget), budget, n, head_features=heads)
        plan = self.plan_from_features(self.features(stats, budget), budget, n)
        if head_allocation == "none" or n <= budget:
            return plan
        return plan.with_adakv_heads(stats, alpha)

    def plans_for_stats(
        self,
        stats: Sequence[LayerStats],
        budget: int,
        head_allocation: str = "none",
        alpha: float = headwise.DEFAULT_ALPHA,
    ) -> list[Plan]:
        """One adaptive plan per batch row: each row's own features and real context length decide its plan (the
        plans an adaptive cache applies from its summaries, :meth:`layerwise_planner`)."""
        batch = stats[0].valid.shape[0]
        rows = ([row_stats(s, r) for s in stats] for r in range(batch))
        return [self.plan_for_stats(r, budget, head_allocation, alpha) for r in rows]

    def layer_summary(self, stats: LayerStats, budget: int) -> LayerSummary:
        """What the plan needs of one layer (batched statistics): the raw signals ``(batch, F)`` of every row, each
        from the row's own statistics (:func:`~polykv_learn.cache.row_stats`) at ``min(budget, n_row)``, and the
        rows' real context lengths."""
        budget = check_budget(budget)
        num_layers = int(self.model_fingerprint["num_layers"])
        rows = [row_stats(stats, r) for r in range(stats.valid.shape[0])]
        overlaps = self.overlap_policies
        features = [layer_features(rs, min(budget, rs.context_length), overlaps, num_layers) for rs in rows]  # (1, F)
        return torch.cat(features), tuple(rs.context_length for rs in rows)  # (batch, F)

    def plans_from_summaries(self, summaries: Sequence[LayerSummary], budget: int) -> list[Plan]:
        """One plan per batch row from the :meth:`layer_summary` of every layer (in layer order)."""
        lengths = summaries[0][1]
        features = torch.stack([f for f, _ in summaries], dim=1)  # (batch, L, F)
        return [self.plan_from_features(features[r], budget, n) for r, n in enumerate(lengths)]

    @torch.no_grad()
    def layer_candidates(self, summary: LayerSummary, budget: int) -> list[set[str]]:
        """For each row of a layer's :meth:`layer_summary`, the policies its plan may give the row there: the
        router's choice from this layer's signals alone (a GBDT router's exactly, row by row; for an MLP router
        every policy within :data:`ROUTER_TIE_TOLERANCE` of the best logit), none for a row whose plan keeps it
        whole (``n_row <= budget``)."""
        features, lengths = summary
        scaled = self.planner.scale(features)  # (batch, F)
        if self.planner.gbdt is not None:
            chosen = [{p} for p in self.planner.gbdt.predict(scaled.cpu().numpy())]
        else:
            logits = self.planner.router(scaled)  # (batch, P)
            best = logits.max(dim=-1, keepdim=True).values  # (batch, 1)
            near = logits >= best - ROUTER_TIE_TOLERANCE * (1 + best.abs())  # (batch, P)
            names = self.planner.router.policies
            chosen = [{names[k] for k in row.nonzero()[:, 0].tolist()} for row in near]
        return [set() if n <= budget else c for c, n in zip(chosen, lengths, strict=True)]

    def layer_head_summary(self, stats: LayerStats, budget: int) -> HeadSummary:
        """:meth:`layer_summary` and, for each row (alone, :func:`~polykv_learn.cache.row_stats`) and each of its
        :meth:`layer_candidates`, the row's :func:`~polykv_learn.headwise.ordered_keys` under that policy: what
        AdaKV's split of the layer needs once its budget is known. The statistics must hold what the candidates
        read (the planner says so: ``summarize_reads_*``)."""
        summary = self.layer_summary(stats, budget)
        candidates = self.layer_candidates(summary, budget)
        rows = [row_stats(stats, r) for r in range(stats.valid.shape[0])]
        keys = tuple(
            {p: headwise.ordered_keys(get_policy(p), rs) for p in sorted(c)}
            for rs, c in zip(rows, candidates, strict=True)
        )
        return summary, keys

    def plans_from_head_summaries(
        self, summaries: Sequence[HeadSummary], budget: int, alpha: float = headwise.DEFAULT_ALPHA
    ) -> list[Plan]:
        """One plan per batch row from every layer's :meth:`layer_head_summary`: the row's
        :meth:`plans_from_summaries` plan, each layer split among its KV heads from the keys kept of its routed
        policy (:meth:`Plan.with_adakv_heads_from_keys`), as :meth:`plan_for_stats` with ``head_allocation``."""
        plans = self.plans_from_summaries([s for s, _ in summaries], budget)
        g = int(self.model_fingerprint["num_kv_heads"])
        out = []
        for r, (plan, n) in enumerate(zip(plans, summaries[0][0][1], strict=True)):

            def keys(layer: int, policy: str, r: int = r) -> tuple[Tensor, Tensor]:
                kept = summaries[layer][1][r]
                if policy not in kept:
                    raise ValueError(
                        f"layer {layer}, row {r}: the plan routes to {policy!r}, but the layer kept head-split keys "
                        f"for {', '.join(kept) or 'none'} only (its router candidates)"
                    )
                return kept[policy]

            out.append(plan if n <= budget else plan.with_adakv_heads_from_keys(keys, n, g, alpha))
        return out

    def layerwise_planner(
        self, budget: int, head_allocation: str = "none", alpha: float = headwise.DEFAULT_ALPHA
    ) -> LayerwisePlanner:
        """The adaptive planner at ``budget`` (what :meth:`make_cache` gives its cache): summarises each layer with
        :meth:`layer_summary`, keeps orders for :meth:`layer_candidates`, plans with :meth:`plans_from_summaries`.
        It holds this object, not a cache (no reference cycle). ``head_allocation="adakv"``: each layer's summary
        also keeps its candidates' ordered keys (:meth:`layer_head_summary`) and the plan splits every layer among
        its KV heads (:meth:`plans_from_head_summaries`); the summary then reads every statistic a routed policy
        needs (H2O's accumulated attention is computed at every layer; KVzip's pass runs before any summary)."""
        budget = check_budget(budget)
        self.check_head_allocation(head_allocation)
        headwise.adakv_floor(alpha, 1)
        if self.allocation_prior is not None:
            raise ValueError(
                f"this router's allocation prior {self.allocation_prior!r} reads every layer's KVzip scores at once, "
                "so it cannot plan layer by layer; its adaptive cache plans from all layers (make_cache)"
            )
        overlap_reads = [get_policy(p) for p in self.overlap_policies]
        if head_allocation == "learned":
            return LayerwisePlanner(
                summarize=functools.partial(learned_heads.layer_summary, self, budget=budget),
                plan=functools.partial(learned_heads.plans_from_summaries, self, budget=budget),
                policies=tuple(self.policies),
                candidates=functools.partial(learned_heads.candidates, self, budget=budget),
                summarize_reads_accumulated_attn=any(p.needs_accumulated_attn for p in overlap_reads),
                summarize_reads_reconstruct_attn=any(p.needs_reconstruct_attn for p in overlap_reads),
            )
        if head_allocation == "adakv":
            used = [get_policy(p) for p in {*self.policies, *self.overlap_policies}]
            return LayerwisePlanner(
                summarize=functools.partial(self.layer_head_summary, budget=budget),
                plan=functools.partial(self.plans_from_head_summaries, budget=budget, alpha=alpha),
                policies=tuple(self.policies),
                candidates=functools.partial(_head_candidates, self, budget=budget),
                summarize_reads_accumulated_attn=any(p.needs_accumulated_attn for p in used),
                summarize_reads_reconstruct_attn=any(p.needs_reconstruct_attn for p in used),
            )
        return LayerwisePlanner(
            summarize=functools.partial(self.layer_summary, budget=budget),
            plan=functools.partial(self.plans_from_summaries, budget=budget),
            policies=tuple(self.policies),
            candidates=functools.partial(self.layer_candidates, budget=budget),
            summarize_reads_accumulated_attn=any(p.needs_accumulated_attn for p in overlap_reads),
            summarize_reads_reconstruct_attn=any(p.needs_reconstruct_attn for p in overlap_reads),
        )

    @torch.no_grad()
    def plan_for(
        self,
        model: PreTrainedModel,
        input_ids: Tensor,
        budget: int,
        attention_mask: Tensor | None = None,
        head_allocation: str = "none",
    ) -> Plan | list[Plan]:
        """The plan(s) adaptive mode would apply, for inspection and the simulator: ``input_ids`` (n,) gives one
        ``Plan``; a batch (batch, n) gives a list with one ``Plan`` per row (also for one row), each from that
        row's own features and real length. A left-padded batch needs its ``attention_mask`` (0 = padding).
        ``head_allocation``: as :meth:`make_cache`'s (``adakv``: each layer split among its KV heads)."""
        self.check_model(model)
        budget = check_budget(budget)
        self.check_head_allocation(head_allocation)
        ids, mask = check_inputs(input_ids, attention_mask)
        cache = CompressedCache(model, capture=self.capture)
        kwargs: dict[str, Any] = {"logits_to_keep": 1}
        if mask is not None:  # the position ids generate gives a left-padded batch
            kwargs.update(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))
        adapter.forward(model, ids, cache, **kwargs)
        plans = self.plans_for_stats(cache.layer_stats, budget, head_allocation)
        return plans[0] if input_ids.ndim == 1 else plans

    def static_plan(self, budget: int) -> Plan:
        """One fixed plan per budget. Static mode does not know the context length, so it plans for
        ``n = max_positions``: a layer budget at or above the real ``n`` keeps that layer whole (design §2).

        With calibrated plans: the plan of the calibrated budget nearest to ``budget`` (in log scale), its layer
        budgets rescaled proportionally to exactly ``L * budget`` within ``[min(b_min, budget), max_positions]``
        (:func:`~polykv_learn.budgets.rescale_budgets`; a calibrated budget is served as calibrated). Without them:
        the router applied to the calibration features of the nearest budget of the training grid."""
        budget = check_budget(budget)
        if not self.calibrated_plans:
            return self.router_static_plan(budget)
        max_n = int(self.model_fingerprint["max_positions"])
        nearest = min(self.calibrated_plans, key=lambda b: (abs(np.log(b / budget)), b))
        plan = self.calibrated_plans[nearest]
        if max_n <= budget:  # nothing is evicted (as the router's plan)
            return Plan.from_lists(plan.policies, [budget] * plan.num_layers)
        lower = min(self.calibrated_b_min, budget)
        return Plan.from_lists(plan.policies, rescale_budgets(plan.budgets, plan.num_layers * budget, lower, max_n))

    def router_static_plan(self, budget: int) -> Plan:
        """The router's own static plan (what :meth:`static_plan` serves without calibrated plans): the router and
        allocator applied to the calibration features of the training grid's budget nearest to ``budget`` (log
        scale), for ``n = max_positions``."""
        budget = check_budget(budget)
        k = min(range(len(self.budgets)), key=lambda i: abs(np.log(self.budgets[i] / budget)))
        return self.plan_from_features(self.calibration[k], budget, int(self.model_fingerprint["max_positions"]))

    # --- deployment ----------------------------------------------------------------------------------------------
    def make_cache(
        self, model: PreTrainedModel, budget: int, mode: str = "adaptive", head_allocation: str = "none"
    ) -> CompressedCache:
        """A fresh cache for ONE ``generate`` call (a second call with it raises); ``mode`` is ``adaptive`` or
        ``static``; ``head_allocation`` is ``none`` (every KV head of a layer keeps ``b_l``) or ``adakv`` (AdaKV's
        split of each layer among its KV heads, adaptive mode only; a layer whose heads differ holds one tensor per
        head, :mod:`polykv_learn.ragged`, so no head is padded to another).

        Batches (left-padded, with their ``attention_mask``): in adaptive mode every row gets the plan of its own
        features and real length (``cache.applied_plans``, one per row), exactly as if it ran alone; in static
        mode every row gets the one calibrated plan. Rows that keep different numbers of positions in a layer are
        held padded to the longest of them, behind a mask (``cache_bytes`` counts those slots)."""
        self.check_model(model)
        budget = check_budget(budget)
        self.check_head_allocation(head_allocation)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "static":
            if head_allocation != "none":
                raise ValueError(
                    f"head_allocation={head_allocation!r} needs mode='adaptive': heads are split by the prefill's own "
                    "scores or signals, and a static plan is fixed before any prefill"
                )
            return CompressedCache(model, plan=self.static_plan(budget))
        if self.allocation_prior is not None:  # the plan needs every layer's statistics after the KVzip pass
            planner = functools.partial(self.plans_for_stats, budget=budget, head_allocation=head_allocation)
            return CompressedCache(model, planner=planner, capture=self.capture)
        return CompressedCache(model, planner=self.layerwise_planner(budget, head_allocation), capture=self.capture)

    @contextlib.contextmanager
    def apply(
        self, model: PreTrainedModel, budget: int, mode: str = "adaptive", head_allocation: str = "none"
    ) -> Iterator[None]:
        """Within the block, every ``model.generate`` call without an explicit cache gets a fresh compressed cache
        (:meth:`make_cache`: in adaptive mode each row of a left-padded batch gets its own plan)."""
        from polykv_learn.deploy.compress import compress

        self.make_cache(model, budget, mode, head_allocation)  # validate now, not at the first generate
        with compress(model, cache_factory=lambda: self.make_cache(model, budget, mode, head_allocation)):
            yield


def _check_head_allocation(head_allocation: str) -> None:
    if head_allocation not in HEAD_ALLOCATIONS:
        raise ValueError(f"head_allocation must be one of {', '.join(HEAD_ALLOCATIONS)}, got {head_allocation!r}")


def _head_candidates(polykv: PolyKV, summary: HeadSummary, budget: int) -> list[set[str]]:
    """A head-allocating layer's candidates: those of its plain summary (:meth:`PolyKV.layer_candidates`)."""
    return polykv.layer_candidates(summary[0], budget)
