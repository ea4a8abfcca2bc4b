"""kvpolicies: compare KV-cache eviction policies of decoder-only LLMs under equal memory budgets."""

from kvpolicies.attention import prepare_model
from kvpolicies.budget import Allocation, Budget, BudgetError, CacheShape
from kvpolicies.cache import CacheStats, CompressedCache
from kvpolicies.hookspecs import hookimpl
from kvpolicies.models import load_model
from kvpolicies.policy import Policy, PolicyConfig, PolicyConfigError, ScoreInputs, Signal
from kvpolicies.registry import (
    PolicyInfo,
    PolicyRegistryError,
    UnknownPolicyError,
    get_policy,
    list_policies,
    reset_registry,
)

__all__ = [
    "Allocation",
    "Budget",
    "BudgetError",
    "CacheShape",
    "CacheStats",
    "CompressedCache",
    "Policy",
    "PolicyConfig",
    "PolicyConfigError",
    "PolicyInfo",
    "PolicyRegistryError",
    "ScoreInputs",
    "Signal",
    "UnknownPolicyError",
    "get_policy",
    "hookimpl",
    "list_policies",
    "load_model",
    "prepare_model",
    "reset_registry",
]
