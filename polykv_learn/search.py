"""Simulator-driven plan search: the best plan of a policy pool for ONE probe (a ceiling, never deployable).

With the sample's own gold answer as the probe, the plan this search finds bounds what any plan of the pool can
do on that sample: the evaluation's ``oracle`` method (``eval/methods.py``). It is a greedy local search:

1. start from the best uniform single policy (lowest loss among ``Plan.uniform(p, B, L)``, ``p`` in the pool);
2. each round evaluates every neighbour of the current plan (:func:`neighbours`) through the simulator, in
   batched probe passes of ``plans_per_pass`` plans, and takes the best one if it lowers the loss;
3. stop when no neighbour improves or after ``max_rounds`` rounds.

Neighbours keep the total ``L * B`` exactly and every budget in ``[min(b_min, B), n]``: budget transfers
(a layer gains ``delta`` positions or its whole context, the other layers funding it as evenly as their room
allows; a layer that holds more than ``B`` gives ``delta`` back to all the others; with ``pairwise``, also
``delta`` from any layer to any other: ``L (L - 1)`` moves per size, opt-in for that cost), per-layer policy
swaps and every layer switched to one policy (never a layer that keeps its whole context: its policy changes
nothing). A round has about ``L * (|deltas| + |policies|)`` moves. The loss never rises (a move is taken only
if it is lower) and the search is deterministic.

Related search: EvolKV (arXiv:2509.08315) evolves per-layer budgets against task performance; this search is
greedy, also moves policies, and scores plans exactly with the masked-attention simulator (design §4.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from polykv_learn.plan import Plan
from polykv_learn.policies import check_policy_name, get_policy
from polykv_learn.simulator import ContextCapture, Simulator, kl_to_full

__all__ = ["LOSSES", "SearchResult", "SearchStep", "neighbours", "search_plan", "spread"]

LOSSES = ("nll", "kl")


@dataclass(frozen=True)
class SearchStep:
    """One accepted move: what it did, the plan and loss after it, and how many neighbours the round had."""

    move: str
    plan: Plan
    loss: float
    candidates: int


@dataclass(frozen=True)
class SearchResult:
    plan: Plan  # the best plan found
    loss: float  # its loss (never above start_loss)
    start_plan: Plan  # the best uniform single policy
    start_loss: float
    history: tuple[SearchStep, ...]  # accepted moves, in order
    evaluated: int  # distinct plans scored


def spread(caps: list[int], total: int) -> list[int]:
    """Split ``total`` units over entries of room ``caps`` as evenly as possible: each takes ``min(cap, t)``
    for the water level ``t``; the last units go one each to the earliest entries with room left."""
    if not 0 <= total <= sum(caps):
        raise ValueError(f"cannot spread {total} units over room {sum(caps)}")
    lo, hi = 0, max(caps, default=0)
    while lo < hi:  # smallest level t with sum(min(c, t)) >= total
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sum(min(c, mid) for c in caps) >= total else (mid + 1, hi)
    out = [min(c, max(lo - 1, 0)) for c in caps]
    left = total - sum(out)
    for k, c in enumerate(caps):
        if left and c > out[k]:
            out[k] += 1
            left -= 1
    return out


def _with(plan: Plan, budgets: list[int] | None = None, policies: list[str] | None = None) -> Plan:
    return Plan(tuple(policies or plan.policies), tuple(budgets or plan.budgets))


def neighbours(
    plan: Plan,
    budget: int,
    context_length: int,
    policies: list[str],
    *,
    b_min: int = 1,
    deltas: tuple[int, ...] | None = None,
    pairwise: bool = False,
) -> list[tuple[str, Plan]]:
    """Every move of one search round from ``plan`` as ``(description, plan)``, distinct, ``plan`` excluded.

    Transfers (``deltas`` default ``(B // 2, B)``; a move that would cross a bound is cut to it):
    ``gain``: layer ``j`` gains ``delta`` or its whole context, the others give as evenly as their room above
    the lower bound allows; ``shrink``: a layer above ``B`` gives ``delta`` to all others (evenly, within their
    room); with ``pairwise``, ``give``: ``delta`` from any layer to any other. Policies: one layer (that does
    not keep its whole context) swapped to another pool policy, or every layer switched to one policy."""
    n, num = context_length, plan.num_layers
    lo, hi = min(b_min, budget), n
    b = list(plan.budgets)
    if sum(b) != num * budget or min(b) < lo or max(b) > hi:
        raise ValueError(f"plan budgets {b} must sum to {num * budget} within [{lo}, {hi}]")
    deltas = tuple(sorted({max(budget // 2, 1), budget} if deltas is None else set(deltas)))
    out: dict[Plan, str] = {}

    def add(move: str, budgets: list[int] | None = None, pols: list[str] | None = None) -> None:
        cand = _with(plan, budgets, pols)
        if cand != plan and cand not in out:
            out[cand] = move

    for j in range(num):  # gain: layer j from all the others
        room = [b[k] - lo if k != j else 0 for k in range(num)]
        for delta in (*deltas, hi - b[j]):
            d = min(delta, hi - b[j], sum(room))
            if d > 0:
                moved = [x - c for x, c in zip(b, spread(room, d), strict=True)]
                moved[j] += d
                whole = " (whole context)" if moved[j] == hi else ""
                add(f"layer {j} +{d}{whole} from the others", moved)
    for i in range(num):
        head = [hi - b[k] if k != i else 0 for k in range(num)]
        for delta in deltas:
            d = min(delta, b[i] - lo, sum(head))
            if d > 0 and b[i] > budget:  # shrink: to all the others
                moved = [x + g for x, g in zip(b, spread(head, d), strict=True)]
                moved[i] -= d
                add(f"layer {i} -{d} to the others", moved)
            for j in range(num) if pairwise else ():  # give: to one layer
                d = min(delta, b[i] - lo, hi - b[j])
                if j != i and d > 0:
                    moved = list(b)
                    moved[i], moved[j] = b[i] - d, b[j] + d
                    add(f"layer {i} -> layer {j}: {d}", moved)
    for layer in range(num):  # swap one layer's policy
        for p in policies:
            if p != plan.policies[layer] and b[layer] < hi:
                swapped = list(plan.policies)
                swapped[layer] = p
                add(f"layer {layer}: {plan.policies[layer]} -> {p}", pols=swapped)
    for p in policies:  # every layer to one policy (but those keeping their whole context)
        add(f"every layer -> {p}", pols=[p if x < hi else q for x, q in zip(b, plan.policies, strict=True)])
    return [(move, cand) for cand, move in out.items()]


class _Scorer:
    """Loss of plans on one probe, memoised per plan, in batched probe passes of the simulator."""

    def __init__(self, sim: Simulator, capture: ContextCapture, probe: Tensor, start: int, loss: str, per_pass: int):
        self.sim, self.capture, self.probe, self.start, self.loss = sim, capture, probe, start, loss
        self.per_pass = per_pass
        self.targets = probe[0, start:]  # (a,) the tokens the loss is over
        self.memo: dict[Plan, float] = {}
        self.full = None
        if loss == "kl":  # full-cache predictions: a plan keeping the whole context (zero bias)
            full = Plan.uniform("streaming", capture.context_length, capture.num_layers)
            self.full = self._predictions(self._logits([full]))[0]  # (a, V)

    def _logits(self, plans: list[Plan]) -> Tensor:
        return self.sim.probe_logits(self.capture, self.probe, self.sim.hard_biases(self.capture, plans))

    def _predictions(self, logits: Tensor) -> Tensor:
        """(P, a, V) logits predicting probe tokens start..m-1 (token 0 from the context's last position)."""
        m = self.probe.shape[1]
        pred = logits[:, max(self.start, 1) - 1 : m - 1]  # row t-1 predicts token t
        if self.start == 0:
            first = self.capture.last_logits.to(logits)[None, None].expand(len(logits), 1, -1)
            pred = torch.cat([first, pred], dim=1)
        return pred

    def __call__(self, plans: list[Plan]) -> list[float]:
        todo = [p for p in dict.fromkeys(plans) if p not in self.memo]
        for at in range(0, len(todo), self.per_pass):
            chunk = todo[at : at + self.per_pass]
            pred = self._predictions(self._logits(chunk)).float()  # (P, a, V)
            if self.loss == "kl":
                values = kl_to_full(self.full, pred)
            else:
                logp = F.log_softmax(pred, dim=-1)
                values = -logp.gather(-1, self.targets.expand(len(chunk), -1)[..., None])[..., 0].mean(-1)
            self.memo.update(zip(chunk, values.tolist(), strict=True))
        return [self.memo[p] for p in plans]


def _best(losses: list[float]) -> int:
    return min(range(len(losses)), key=lambda i: (losses[i], i))  # ties: the earlier candidate


@torch.no_grad()
def search_plan(
    simulator: Simulator,
    capture: ContextCapture,
    probe_ids: Tensor,
    budget: int,
    policies: list[str] | tuple[str, ...],
    *,
    loss: str = "nll",
    answer_start: int | None = None,
    b_min: int = 1,
    max_rounds: int = 8,
    plans_per_pass: int = 32,
    deltas: tuple[int, ...] | None = None,
    pairwise: bool = False,
    starts: Sequence[Plan] = (),
) -> SearchResult:
    """Greedy search for the plan of lowest loss on ``probe_ids`` (see the module docstring).

    ``capture``: the context's prefill (``simulator.capture``, or built from an evaluation's shared prefill);
    ``probe_ids`` (m,) or (1, m): what follows the context; ``budget``: the average budget ``B``; ``policies``:
    the pool. ``loss``: ``nll`` of the probe tokens from ``answer_start`` on (default 0: the whole probe; token
    0 is predicted by the context alone) or ``kl``: mean KL(full cache || plan) over the same tokens. When
    ``n <= B`` nothing is evicted and the best uniform plan is returned without moves. ``starts``: more
    starting candidates (e.g. the learned router's plan for this input), scored with the uniform plans; each must
    have ``L`` layers, the exact total ``L * B`` and policies of the pool.
    """
    probe = probe_ids[None] if probe_ids.ndim == 1 else probe_ids  # (1, m)
    if probe.ndim != 2 or probe.shape[0] != 1 or probe.shape[1] == 0:
        raise ValueError(f"probe_ids must have shape (m,) or (1, m) with m >= 1, got {tuple(probe_ids.shape)}")
    m, n, num = probe.shape[1], capture.context_length, capture.num_layers
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    start = 0 if answer_start is None else answer_start
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < m:
        raise ValueError(f"answer_start must be an integer in [0, {m - 1}] (the probe has {m} tokens), got {start!r}")
    ints = {"budget": (budget, 1), "b_min": (b_min, 1), "max_rounds": (max_rounds, 0)}
    ints["plans_per_pass"] = (plans_per_pass, 1)
    for name, (value, least) in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    pool = list(dict.fromkeys(policies))
    if not pool:
        raise ValueError("policies is empty: give the pool of policies to search over")
    for p in pool:
        check_policy_name(p)
        if get_policy(p).needs_accumulated_attn and capture.stats[0].accumulated_attn is None:
            raise ValueError(f"policy {p!r} needs the prefill's accumulated attention; capture with accumulate=True")
        if get_policy(p).needs_reconstruct_attn and capture.stats[0].reconstruct_attn is None:
            raise ValueError(f"policy {p!r} needs the reconstruction attention; capture with reconstruct=True")

    score = _Scorer(simulator, capture, probe.long(), start, loss, plans_per_pass)
    uniform = [Plan.uniform(p, budget, num) for p in pool]
    for extra in starts:
        if len(extra.budgets) != num or sum(extra.budgets) != num * budget or not set(extra.policies) <= set(pool):
            raise ValueError(
                f"a start plan must have {num} layers, total {num * budget} and policies of the pool {pool}; got "
                f"{len(extra.budgets)} layers, total {sum(extra.budgets)}, policies {sorted(set(extra.policies))}"
            )
    candidates = uniform + [extra for extra in starts if n > budget]
    losses = score(candidates)
    first = _best(losses)
    plan, value = candidates[first], losses[first]
    start_plan, start_loss = plan, value
    history: list[SearchStep] = []
    if n > budget:
        for _ in range(max_rounds):
            moves = neighbours(plan, budget, n, pool, b_min=b_min, deltas=deltas, pairwise=pairwise)
            if not moves:
                break
            losses = score([cand for _, cand in moves])
            i = _best(losses)
            if not losses[i] < value:
                break
            plan, value = moves[i][1], losses[i]
            history.append(SearchStep(moves[i][0], plan, value, len(moves)))
    return SearchResult(plan, value, start_plan, start_loss, tuple(history), len(score.memo))
