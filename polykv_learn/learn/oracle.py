"""Oracle labels for the gradient-boosted router: per layer, the policy whose single-layer swap helps most.

For each document and budget, start from the best uniform single policy (lowest simulated KL), then for every
layer and every other policy evaluate the plan with only that layer swapped (all swaps batched through the
simulator). A layer's label is the policy with the lowest KL (its base policy when no swap helps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from polykv_learn.learn.store import StoredPrefill
from polykv_learn.plan import Plan
from polykv_learn.simulator import Simulator, kl_to_full

PLANS_PER_PASS = 32


@torch.no_grad()
def plan_kls(sim: Simulator, prefill: StoredPrefill, plans: Sequence[Plan]) -> Tensor:
    """Simulated KL to the full cache of each plan (P,), in passes of ``PLANS_PER_PASS`` plans."""
    device = next(sim.model.parameters()).device
    capture = prefill.to_capture(device=device)
    probe_ids, full_logprobs = prefill.probe_ids.to(device), prefill.full_logprobs.to(device)
    out = []
    for start in range(0, len(plans), PLANS_PER_PASS):
        chunk = list(plans[start : start + PLANS_PER_PASS])
        logits = sim.probe_logits(capture, probe_ids, sim.hard_biases(capture, chunk))
        out.append(kl_to_full(full_logprobs, logits).cpu())
    return torch.cat(out)


def oracle_labels(
    sim: Simulator,
    prefills: Sequence[StoredPrefill],
    policies: Sequence[str],
    budgets: Sequence[int],
    scale: Callable[[Tensor], Tensor],
) -> tuple[np.ndarray, list[str]]:
    """Scaled features (N, F) and oracle policy labels (N,), one row per (document, budget, layer)."""
    rows, labels = [], []
    for prefill in prefills:
        n = prefill.context_length
        for budget in budgets:
            if budget >= n or budget not in prefill.budgets.tolist():
                continue
            num_layers = len(prefill.keys)
            uniform = [Plan.uniform(p, budget, num_layers) for p in policies]
            base = policies[int(plan_kls(sim, prefill, uniform).argmin())]
            swaps = [(layer, p) for layer in range(num_layers) for p in policies if p != base]
            plans = [
                Plan.from_lists([p if i == layer else base for i in range(num_layers)], [budget] * num_layers)
                for layer, p in swaps
            ]
            kls = plan_kls(sim, prefill, plans)
            base_kl = float(plan_kls(sim, prefill, [Plan.uniform(base, budget, num_layers)])[0])
            best = {layer: (base_kl, base) for layer in range(num_layers)}
            for (layer, p), kl in zip(swaps, kls.tolist(), strict=True):
                if kl < best[layer][0]:
                    best[layer] = (kl, p)
            rows.append(scale(prefill.features_at(budget)))
            labels += [best[layer][1] for layer in range(num_layers)]
    if not rows:
        raise ValueError(f"no document is longer than the oracle budgets {list(budgets)}")
    return torch.cat(rows).numpy(), labels
