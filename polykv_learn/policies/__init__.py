"""Eviction policies (scorers) and their registry.

Each policy lives in its own module and registers itself with :func:`register_policy`; look one up with
:func:`get_policy`. See ``docs/design.md`` §3 and ``docs/adding-a-policy.md``.
"""

from __future__ import annotations

from polykv_learn.policies.base import LayerStats, Policy, keep_indices, keep_ranks, order_positions

POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"a policy named {cls.name!r} is already registered ({POLICIES[cls.name].__name__})")
    POLICIES[cls.name] = cls
    return cls


def policy_names(routable_only: bool = False) -> list[str]:
    """Registered policy names (in registration order)."""
    return [name for name, cls in POLICIES.items() if cls.routable or not routable_only]


def check_policy_name(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    return name


def get_policy(name: str, **options) -> Policy:
    """An instance of the policy registered as ``name`` (options go to its dataclass fields)."""
    return POLICIES[check_policy_name(name)](**options)


# Importing the modules registers the built-in policies.
from polykv_learn.policies import (  # noqa: E402,F401
    expected_attention,
    h2o,
    keydiff,
    knorm,
    kvzip,
    random_scores,
    snapkv,
    streaming,
    tova,
)

__all__ = [
    "LayerStats",
    "POLICIES",
    "Policy",
    "check_policy_name",
    "get_policy",
    "keep_indices",
    "keep_ranks",
    "order_positions",
    "policy_names",
    "register_policy",
]
