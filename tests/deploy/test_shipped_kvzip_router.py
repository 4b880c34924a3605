"""The shipped experimental router with KVzip/KeyDiff in its pool and the kvzip_global allocation prior loads, plans
SmolLM2 with the exact total, and its allocator starts from (and keeps a gain on) the prior column."""

from pathlib import Path

import torch

from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.models import load_model

ROUTER = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m-kvzip"


def test_the_kvzip_prior_router_plans_smollm2_with_the_exact_total():
    polykv = PolyKV.from_pretrained(ROUTER)
    assert polykv.allocation_prior == "kvzip_global" and {"kvzip", "keydiff"} <= set(polykv.policies)
    assert polykv.capture.reconstruct and polykv.planner.allocator.prior == len(polykv.feature_names) - 1
    model, _ = load_model("smollm2-135m", with_tokenizer=False)
    ids = torch.randint(100, 40000, (700,), generator=torch.Generator().manual_seed(0))
    plan = polykv.plan_for(model, ids, 128)
    assert plan.total_budget == 30 * 128 and all(1 <= b <= 700 for b in plan.budgets)
    assert polykv.static_plan(128).total_budget == 30 * 128
