"""polykv-learn: learn per-layer KV-cache eviction policies and budgets, deploy them in Hugging Face generate."""

from polykv_learn.cache import CompressedCache, cache_bytes, padding_bytes
from polykv_learn.capture import CaptureOptions
from polykv_learn.models import load_model
from polykv_learn.plan import Plan
from polykv_learn.policies import get_policy, policy_names
from polykv_learn.simulator import SimulationResult, Simulator

__version__ = "0.1.0"

__all__ = [
    "CaptureOptions",
    "CompressedCache",
    "Plan",
    "SimulationResult",
    "Simulator",
    "cache_bytes",
    "get_policy",
    "load_model",
    "padding_bytes",
    "policy_names",
]
