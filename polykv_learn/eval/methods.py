"""The evaluation's method registry: a name -> how to get the eviction :class:`~polykv_learn.plan.Plan` of one
sample at one average budget, from the statistics its (shared) prefill captured.

=====================  ========================================================================================
name                   plan
=====================  ========================================================================================
``full``               no eviction (the full cache)
``<policy>``           every routable policy of :mod:`polykv_learn.policies` by its registry name (``snapkv``,
                       ``streaming``, ``h2o``, ``tova``, ``knorm``, ``expected_attention``, ``keydiff``,
                       ``kvzip``): that policy at every layer with the uniform budget ``B``; ``random`` (a
                       control) is allowed but not a default method
``pyramid``            PyramidKV's linear schedule (arXiv:2406.02069) with SnapKV scores
``cake``               CAKE-style allocation (arXiv:2503.12491) with SnapKV scores: layer budgets proportional to
                       ``entropy * temporal variance`` of the layer's window attention
``kvzip-global``       KVzip's own allocation (arXiv:2505.23416) with KVzip scores: one top-``L*G*B`` over the
                       ``(layer, KV head, position)`` scores, each layer's divided by its largest, sinks first;
                       a layer's budget is its share of that top-k over its ``G`` heads (rounded, exact total);
                       needs the reconstruction pass
``kvzip-global-heads`` KVzip's per-head selection: ``kvzip-global``'s layer budgets, each layer's ``G*b_l`` then
                       shared among its KV heads by one top over the same scores, no floor (so a head keeps what
                       the global top-k takes of it, up to rounding its layer's count to a multiple of ``G``)
``adakv``              AdaKV (arXiv:2407.11550) with SnapKV scores: the uniform layer budget ``B``, each layer's
                       ``G*B`` shared among its KV heads by one top over their scores, at least ``0.2 B`` per head
                       (:meth:`~polykv_learn.plan.Plan.adakv`); the deployed cache holds a layer whose heads
                       differ one tensor per head (:mod:`polykv_learn.ragged`; ``kv_bytes``: no padding)
``adakv-global``       AdaKV across layers with SnapKV scores: one top-``L*G*B`` over the layers' max-normalised
                       scores with the same floor per head; layer budgets from its counts (rounded, exact total),
                       then AdaKV within each layer (:meth:`~polykv_learn.plan.Plan.adakv_global`)
``polykv``             the learned router + allocator (``--router DIR``), adaptive: the plan is decided from the
                       features of this very prefill (:meth:`PolyKV.plan_for_stats`)
``polykv-heads``       ``polykv``'s plan with head-wise budgets. A router fitted with a learned head allocator
                       (``model.head_allocation: learned``) splits every layer's ``G*b_l`` with it (deployed with
                       ``make_cache(..., head_allocation="learned")``); any other router with AdaKV's split
                       (arXiv:2407.11550): one top over the layer's own routed policy's scores, at least ``0.2 b_l``
                       per head (:meth:`~polykv_learn.plan.Plan.with_adakv_heads`; ``head_allocation="adakv"``).
                       ``results.json``'s ``config.head_allocation`` says which
``polykv-static``      the same artifact's static plan: one fixed plan per budget, from its calibration
                       features (:meth:`PolyKV.static_plan`)
``polykv-gbdt``        the GBDT variant (``--gbdt-router DIR``: an artifact whose router is ``gbdt``), adaptive
``oracle``             NOT deployable, an upper bound of the pool: the plan :func:`polykv_learn.search.search_plan`
                       finds with the sample's own question, answer prefix and gold answer as the probe (NLL of the
                       gold answer); routable policies, H2O and KVzip only when the prefill recorded their
                       statistics. Slow, so never a default method
=====================  ========================================================================================

Budgets count every kept position per KV head and layer (design §2). Allocations that would give a layer more
than the context (``pyramid``, ``cake``) are capped at ``n`` and the excess is redistributed, so that every
method keeps the same total ``L * B`` when ``n > B``; when ``n <= B`` nothing is evicted. The static plan is
computed for the model's maximum length, so a layer's budget may exceed a shorter context (it then keeps all of
it; static mode cannot know ``n`` in advance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.headwise import ordered_keys
from polykv_learn.kvzip_global import KVZIP_POLICY, global_layer_budgets, global_plan, normalised_scores
from polykv_learn.plan import Plan
from polykv_learn.policies import POLICIES, LayerStats, get_policy, policy_names
from polykv_learn.rows import row_stats
from polykv_learn.search import SearchResult, search_plan
from polykv_learn.simulator import ContextCapture, Simulator

__all__ = [
    "ADAKV_POLICY",
    "BASELINE_POLICY",
    "KVZIP_POLICY",
    "GoldProbe",
    "LEARNED_METHODS",
    "Method",
    "MethodInput",
    "ORACLE_REFUSAL",
    "ORACLE_ROUNDS",
    "available_methods",
    "cake_signals",
    "default_method_names",
    "kvzip_global_budgets",
    "oracle_policies",
    "resolve_methods",
    "single_policy_methods",
]

#: the scorer used by the layer-allocation baselines (``pyramid``, ``cake``)
BASELINE_POLICY = "snapkv"
#: the scorer whose scores ``adakv`` and ``adakv-global`` share among KV heads (AdaKV's own pairing)
ADAKV_POLICY = "snapkv"
#: the methods a trained artifact provides (gap recovery is reported for these)
LEARNED_METHODS = ("polykv", "polykv-heads", "polykv-static", "polykv-gbdt")
#: why ``oracle`` exists nowhere but in the evaluation
ORACLE_REFUSAL = "oracle needs the gold answer: it exists only in evaluate as an upper bound"
#: the oracle's default most search rounds (:func:`polykv_learn.search.search_plan`'s ``max_rounds``)
ORACLE_ROUNDS = 8


@dataclass(frozen=True)
class GoldProbe:
    """A sample's own gold answer as a simulator probe: what only the ``oracle`` method sees (which makes it an
    upper bound, never a deployable method). ``searches`` keeps the search of each budget (for the records)."""

    simulator: Simulator
    capture: ContextCapture  # the sample's shared prefill
    probe_ids: Tensor  # (1, m + a): what follows the compression (question, answer prefix), then the gold answer
    answer_start: int  # m: where the gold answer starts in probe_ids
    searches: dict[int, SearchResult] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInput:
    """What a method sees of one sample: the prefill statistics of every layer (batch element 0 is used), and
    for the ``oracle`` alone the gold-answer probe."""

    stats: Sequence[LayerStats]
    gold: GoldProbe | None = None

    @property
    def num_layers(self) -> int:
        return len(self.stats)

    @property
    def context_length(self) -> int:
        return self.stats[0].context_length


#: ``fn(sample, budget) -> Plan`` (``None``: no eviction)
PlanFn = Callable[[MethodInput, int], Plan | None]
#: ``fn(sample, budget) -> fields`` added to the method's record of that sample and budget (after ``plan``)
ExtrasFn = Callable[[MethodInput, int], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """One evaluated method. ``kind``: ``full``, ``single`` (one policy, uniform budget), ``allocation``
    (a layer-allocation baseline), ``learned`` or ``oracle`` (needs :attr:`MethodInput.gold`)."""

    name: str
    kind: str
    description: str
    plan_fn: PlanFn
    extras_fn: ExtrasFn | None = None
    head_allocation: str | None = None  # how a head-wise learned method splits its layers (``learned``/``adakv``)

    def plan(self, sample: MethodInput, budget: int) -> Plan | None:
        return self.plan_fn(sample, budget)

    def extras(self, sample: MethodInput, budget: int) -> dict[str, Any]:
        return {} if self.extras_fn is None else self.extras_fn(sample, budget)


# --- plan builders ----------------------------------------------------------------------------------------------
def _full(sample: MethodInput, budget: int) -> None:
    return None


def _uniform(policy: str) -> PlanFn:
    def plan(sample: MethodInput, budget: int) -> Plan:
        return Plan.uniform(policy, budget, sample.num_layers)

    return plan


def _pyramid(sample: MethodInput, budget: int) -> Plan:
    return Plan.pyramid(BASELINE_POLICY, budget, sample.num_layers, context_length=sample.context_length)


def cake_signals(stats: Sequence[LayerStats]) -> tuple[list[float], list[float]]:
    """Per layer, CAKE's spatial dispersion and temporal shift of the window attention (batch element 0):
    the entropy of each window query's attention (mean over query heads and window queries) and the variance
    of each position's attention across window queries, summed over positions (mean over query heads)."""
    entropies, variances = [], []
    for s in stats:
        entropy, variance = s.memo("cake_signals", lambda s=s: _cake_layer_signals(s))
        entropies.append(entropy)
        variances.append(variance)
    return entropies, variances


def _cake_layer_signals(stats: LayerStats) -> tuple[float, float]:
    attn = stats.window_attn[0].float()  # (H, w, n)
    return float(-torch.xlogy(attn, attn).sum(dim=-1).mean()), float(attn.var(dim=1, correction=0).sum(dim=-1).mean())


def _cake(sample: MethodInput, budget: int) -> Plan:
    n = sample.context_length
    if n <= budget:
        return Plan.uniform(BASELINE_POLICY, budget, sample.num_layers)
    entropies, variances = cake_signals(sample.stats)
    if not any(e * v > 0 for e, v in zip(entropies, variances, strict=True)):  # degenerate: no preference
        return Plan.uniform(BASELINE_POLICY, budget, sample.num_layers)
    return Plan.cake(BASELINE_POLICY, budget, entropies, variances, b_max=n)


def kvzip_global_budgets(stats: Sequence[LayerStats], budget: int) -> list[int]:
    """KVzip's global allocation (arXiv:2505.23416; kvpress ``KVzipPress`` with ``layerwise=False``) for batch
    element 0: :func:`polykv_learn.kvzip_global.global_layer_budgets`."""
    return global_layer_budgets(stats, budget)


def _kvzip_global(sample: MethodInput, budget: int) -> Plan:
    budgets = kvzip_global_budgets(sample.stats, budget)
    return Plan.from_lists([KVZIP_POLICY] * sample.num_layers, budgets)


def _kvzip_global_heads(sample: MethodInput, budget: int) -> Plan:
    """``kvzip-global``'s plan with KVzip's own head split: within a layer the global top-k ranks the heads'
    positions by the same max-normalised scores (one divisor per layer), so the layer's top-``G*b_l`` over them,
    sinks first, is that selection restricted to the layer. ``n <= B``: nothing evicted (no head budgets)."""
    rows = [row_stats(s, 0) for s in sample.stats]
    scorer = get_policy(KVZIP_POLICY)
    return global_plan([normalised_scores(s) for s in rows], budget, [ordered_keys(scorer, s) for s in rows])


def _adakv(sample: MethodInput, budget: int) -> Plan:
    return Plan.adakv(ADAKV_POLICY, budget, [row_stats(s, 0) for s in sample.stats])


def _adakv_global(sample: MethodInput, budget: int) -> Plan:
    return Plan.adakv_global(ADAKV_POLICY, budget, [row_stats(s, 0) for s in sample.stats])


def _adaptive(polykv: PolyKV) -> PlanFn:
    def plan(sample: MethodInput, budget: int) -> Plan:
        return polykv.plan_for_stats(sample.stats, budget)

    return plan


def heads_of(polykv: PolyKV) -> str:
    """``polykv-heads``'s head split for this router: ``learned`` when it has a head allocator, else ``adakv``."""
    return "learned" if polykv.planner.head_allocator is not None else "adakv"


def _adaptive_heads(polykv: PolyKV) -> PlanFn:
    how = heads_of(polykv)

    def plan(sample: MethodInput, budget: int) -> Plan:
        return polykv.plan_for_stats(sample.stats, budget, head_allocation=how)

    return plan


def _static(polykv: PolyKV) -> PlanFn:
    cache: dict[int, Plan] = {}

    def plan(sample: MethodInput, budget: int) -> Plan:
        if budget not in cache:
            cache[budget] = polykv.static_plan(budget)
        return cache[budget]

    return plan


def oracle_policies(stats: Sequence[LayerStats]) -> list[str]:
    """The oracle's pool: the routable policies, those needing accumulated attention (H2O) or the reconstruction
    attention (KVzip) only if recorded."""
    acc, rec = stats[0].accumulated_attn is not None, stats[0].reconstruct_attn is not None
    return [
        p
        for p in policy_names(routable_only=True)
        if (acc or not POLICIES[p].needs_accumulated_attn) and (rec or not POLICIES[p].needs_reconstruct_attn)
    ]


def _oracle(rounds: int, router: PolyKV | None = None) -> tuple[PlanFn, ExtrasFn]:
    """The oracle's plan (a search of at most ``rounds`` rounds) and its record fields. With a ``router``, its
    adaptive plan for the sample is one more starting point, so the ceiling is never below ``polykv``."""

    def search(sample: MethodInput, budget: int) -> SearchResult:
        gold = sample.gold
        if gold is None:
            raise ValueError(ORACLE_REFUSAL)
        if budget not in gold.searches:
            pool = oracle_policies(sample.stats)
            learned = [router.plan_for_stats(sample.stats, budget)] if router is not None else []
            gold.searches[budget] = search_plan(
                gold.simulator,
                gold.capture,
                gold.probe_ids,
                budget,
                pool,
                loss="nll",
                answer_start=gold.answer_start,
                max_rounds=rounds,
                starts=[p for p in learned if set(p.policies) <= set(pool)],
            )
        return gold.searches[budget]

    def plan(sample: MethodInput, budget: int) -> Plan:
        return search(sample, budget).plan

    def extras(sample: MethodInput, budget: int) -> dict[str, Any]:
        """The search behind the record: its start (the best uniform policy's name, or ``polykv`` when the learned
        plan started it) and final simulated gold-answer NLL."""
        found = search(sample, budget)
        uniform = len(set(found.start_plan.policies)) == 1 and len(set(found.start_plan.budgets)) == 1
        return {
            "search_start_policy": found.start_plan.policies[0] if uniform else "polykv",
            "search_start_nll": found.start_loss,
            "search_nll": found.loss,
            "search_moves": len(found.history),
            "search_plans": found.evaluated,
        }

    return plan, extras


# --- registry ---------------------------------------------------------------------------------------------------
def single_policy_methods(include_controls: bool = False) -> list[str]:
    """Names of the single-policy methods: the routable policies (plus controls such as ``random``)."""
    return policy_names(routable_only=not include_controls)


def available_methods(
    router: PolyKV | None = None, gbdt: PolyKV | None = None, oracle_rounds: int = ORACLE_ROUNDS
) -> dict[str, Method]:
    """Every method that can run with the given artifacts, in report order (``random`` last); ``oracle_rounds``:
    the most search rounds of ``oracle`` (each scores about ``L * (3 + |policies|)`` plans)."""
    methods: dict[str, Method] = {"full": Method("full", "full", "no eviction", _full)}
    for name in single_policy_methods(include_controls=True):
        control = "" if POLICIES[name].routable else " (control)"
        methods[name] = Method(name, "single", f"{name} at every layer, uniform budget{control}", _uniform(name))
    methods["pyramid"] = Method("pyramid", "allocation", "PyramidKV linear schedule, SnapKV scores", _pyramid)
    methods["cake"] = Method("cake", "allocation", "CAKE entropy x variance allocation, SnapKV scores", _cake)
    about = "KVzip global top-k over layers, KVzip scores"
    methods["kvzip-global"] = Method("kvzip-global", "allocation", about, _kvzip_global)
    about = "KVzip global top-k over layers and KV heads, KVzip scores"
    methods["kvzip-global-heads"] = Method("kvzip-global-heads", "allocation", about, _kvzip_global_heads)
    about = "AdaKV head-wise allocation within each layer, SnapKV scores"
    methods["adakv"] = Method("adakv", "allocation", about, _adakv)
    about = "AdaKV head-wise allocation across layers, SnapKV scores"
    methods["adakv-global"] = Method("adakv-global", "allocation", about, _adakv_global)
    if router is not None:
        methods["polykv"] = Method("polykv", "learned", "learned router + allocator, adaptive", _adaptive(router))
        how = heads_of(router)
        about = "learned router + allocator, adaptive, " + (
            "learned head allocator" if how == "learned" else "AdaKV head-wise split of each layer"
        )
        methods["polykv-heads"] = Method("polykv-heads", "learned", about, _adaptive_heads(router), head_allocation=how)
        methods["polykv-static"] = Method(
            "polykv-static", "learned", "learned router + allocator, static plan", _static(router)
        )
    if gbdt is not None:
        if gbdt.planner.gbdt is None:
            raise ValueError("the --gbdt-router artifact has an MLP router, not a GBDT one (router type 'gbdt')")
        methods["polykv-gbdt"] = Method("polykv-gbdt", "learned", "GBDT router + allocator, adaptive", _adaptive(gbdt))
    if isinstance(oracle_rounds, bool) or not isinstance(oracle_rounds, int) or oracle_rounds < 0:
        raise ValueError(f"oracle_rounds must be an integer >= 0, got {oracle_rounds!r}")
    oracle = _oracle(oracle_rounds, router)
    about = "plan search on the gold answer (upper bound, not deployable)"
    methods["oracle"] = Method("oracle", "oracle", about, *oracle)
    random_first = [m for m in methods if m in POLICIES and not POLICIES[m].routable]
    return {k: methods[k] for k in [m for m in methods if m not in random_first] + random_first}


def all_method_names() -> list[str]:
    """Every name ``--methods`` may ever accept (some need an artifact)."""
    return [
        "full",
        *single_policy_methods(include_controls=True),
        "pyramid",
        "cake",
        "kvzip-global",
        "kvzip-global-heads",
        "adakv",
        "adakv-global",
        *LEARNED_METHODS,
        "oracle",
    ]


def default_method_names(available: dict[str, Method]) -> list[str]:
    """All available methods except controls and the (slow) ``oracle``."""
    return [m for m in available if not (m in POLICIES and not POLICIES[m].routable) and m != "oracle"]


def resolve_methods(names: Sequence[str] | None, available: dict[str, Method]) -> list[Method]:
    """The methods to run (``None``: the defaults), ``full`` always first; clear errors for bad names."""
    if names is None:
        names = default_method_names(available)
    allowed = all_method_names()
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
    missing = [n for n in names if n not in available]
    if missing:
        router = "--router DIR"
        needs = {"polykv": router, "polykv-heads": router, "polykv-static": router, "polykv-gbdt": "--gbdt-router DIR"}
        what = ", ".join(f"{n!r} needs {needs.get(n, 'an artifact')}" for n in missing)
        raise ValueError(f"method(s) not available: {what}")
    seen: list[str] = []
    for n in ["full", *names]:
        if n not in seen:
            seen.append(n)
    return [available[n] for n in seen]
