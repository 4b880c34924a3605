"""A valid (untrained) PolyKV artifact for a tiny model, without running a fit."""

import torch

from polykv_learn.adapter import model_dims
from polykv_learn.deploy.artifact import write_artifact
from polykv_learn.features import feature_names
from polykv_learn.planner.allocator import BudgetAllocator
from polykv_learn.planner.router import MLPRouter


def make_artifact(
    directory, model, policies=("snapkv", "streaming", "knorm"), seed=0, random_allocator=False, allocation_prior=None
):
    """Fresh router/allocator weights and identity scaling; ``random_allocator`` gives non-uniform budgets;
    ``allocation_prior`` (``kvzip_global``) an allocator that follows that column (gain 1, scale 1)."""
    overlap = ["snapkv", "streaming"]
    names = feature_names(overlap, allocation_prior)
    torch.manual_seed(seed)
    router = MLPRouter(len(names), list(policies), hidden=8)
    prior = names.index(allocation_prior) if allocation_prior else None
    allocator = BudgetAllocator(len(names), hidden=8, prior=prior)
    if random_allocator:
        with torch.no_grad():
            for p in allocator.parameters():
                p.normal_(0, 1.0)
    budgets = [32, 64, 128]
    tensors = {f"router.{k}": v for k, v in router.state_dict().items()}
    tensors.update({f"allocator.{k}": v for k, v in allocator.state_dict().items()})
    tensors["calibration_features"] = torch.randn(len(budgets), model_dims(model).num_layers, len(names))
    config = {
        "model": model_dims(model).to_dict(),
        "policies": list(policies),
        "overlap_policies": overlap,
        "feature_names": names,
        "scaler": {"mean": [0.0] * len(names), "std": [1.0] * len(names)},
        "router": {"type": "mlp", "hidden": 8, "num_hidden_layers": router.num_hidden_layers},
        "allocator": {
            "hidden": 8,
            "num_hidden_layers": allocator.num_hidden_layers,
            **({} if prior is None else {"prior": prior}),
        },  # fmt: skip
        "b_min": 4,
        "capture": {"window": 16, "future": 16, "chunk": 64},
        "budgets": budgets,
        **({"allocation_prior": allocation_prior} if allocation_prior else {}),
    }
    return write_artifact(directory, config, tensors)
