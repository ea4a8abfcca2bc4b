"""kvpolicies: compare KV-cache eviction policies of decoder-only LLMs under equal memory budgets.

The public names below are imported on first use: ``kvpolicies --help`` and other commands that need no model must
not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvpolicies.errors import (
    BudgetError,
    KVPoliciesError,
    ModelLoadError,
    PolicyConfigError,
    PolicyRegistryError,
    UnknownPolicyError,
    UsageError,
)
from kvpolicies.hookspecs import hookimpl

_LAZY = {
    "prepare_model": "kvpolicies.attention",
    "Allocation": "kvpolicies.budget",
    "Budget": "kvpolicies.budget",
    "CacheShape": "kvpolicies.budget",
    "distribute": "kvpolicies.budget",
    "CacheStats": "kvpolicies.cache",
    "CompressedCache": "kvpolicies.cache",
    "ScorerWrapper": "kvpolicies.composition",
    "WrapperConfig": "kvpolicies.composition",
    "load_model": "kvpolicies.models",
    "Policy": "kvpolicies.policy",
    "PolicyConfig": "kvpolicies.policy",
    "ScoreInputs": "kvpolicies.policy",
    "Signal": "kvpolicies.policy",
    "PolicyInfo": "kvpolicies.registry",
    "get_policy": "kvpolicies.registry",
    "list_policies": "kvpolicies.registry",
    "reset_registry": "kvpolicies.registry",
}

if TYPE_CHECKING:
    from kvpolicies.attention import prepare_model
    from kvpolicies.budget import Allocation, Budget, CacheShape, distribute
    from kvpolicies.cache import CacheStats, CompressedCache
    from kvpolicies.composition import ScorerWrapper, WrapperConfig
    from kvpolicies.models import load_model
    from kvpolicies.policy import Policy, PolicyConfig, ScoreInputs, Signal
    from kvpolicies.registry import PolicyInfo, get_policy, list_policies, reset_registry


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'kvpolicies' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "Allocation",
    "Budget",
    "BudgetError",
    "CacheShape",
    "CacheStats",
    "CompressedCache",
    "distribute",
    "get_policy",
    "hookimpl",
    "KVPoliciesError",
    "list_policies",
    "load_model",
    "ModelLoadError",
    "Policy",
    "PolicyConfig",
    "PolicyConfigError",
    "PolicyInfo",
    "PolicyRegistryError",
    "prepare_model",
    "reset_registry",
    "ScoreInputs",
    "ScorerWrapper",
    "Signal",
    "UnknownPolicyError",
    "UsageError",
    "WrapperConfig",
]
