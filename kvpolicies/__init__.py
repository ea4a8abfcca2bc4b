"""kvpolicies: compare KV-cache eviction policies of decoder-only LLMs under equal memory budgets.

The public names below are imported on first use: ``kvpolicies --help`` and other commands that need no model must
not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvpolicies.errors import (
    BudgetError,
    CalibrationError,
    KVPoliciesError,
    ModelLoadError,
    PluginError,
    PolicyConfigError,
    PolicyRegistryError,
    UnknownCodecError,
    UnknownPolicyError,
    UsageError,
)
from kvpolicies.hookspecs import hookimpl

_LAZY = {
    "prepare_model": "kvpolicies.engine.attention",
    "Allocation": "kvpolicies.engine.budget",
    "Budget": "kvpolicies.engine.budget",
    "CacheShape": "kvpolicies.engine.budget",
    "distribute": "kvpolicies.engine.budget",
    "CacheStats": "kvpolicies.engine.cache",
    "Calibration": "kvpolicies.engine.calibration",
    "CompressedCache": "kvpolicies.engine.cache",
    "Codec": "kvpolicies.engine.codecs",
    "GroupedCodec": "kvpolicies.engine.codecs",
    "CodecInfo": "kvpolicies.registry",
    "get_codec": "kvpolicies.registry",
    "list_codecs": "kvpolicies.registry",
    "ScorerWrapper": "kvpolicies.engine.composition",
    "WrapperConfig": "kvpolicies.engine.composition",
    "load_model": "kvpolicies.integrations.models",
    "Policy": "kvpolicies.engine.policy",
    "PolicyConfig": "kvpolicies.engine.policy",
    "Role": "kvpolicies.engine.policy",
    "LayerView": "kvpolicies.engine.layer_view",
    "policy_with_role": "kvpolicies.registry",
    "ScoreInputs": "kvpolicies.engine.policy",
    "Signal": "kvpolicies.engine.policy",
    "Track": "kvpolicies.engine.signals",
    "PolicyInfo": "kvpolicies.registry",
    "get_policy": "kvpolicies.registry",
    "list_policies": "kvpolicies.registry",
    "reset_registry": "kvpolicies.registry",
}

if TYPE_CHECKING:
    from kvpolicies.engine.attention import prepare_model
    from kvpolicies.engine.budget import Allocation, Budget, CacheShape, distribute
    from kvpolicies.engine.cache import CacheStats, CompressedCache
    from kvpolicies.engine.calibration import Calibration
    from kvpolicies.engine.codecs import Codec, GroupedCodec
    from kvpolicies.engine.composition import ScorerWrapper, WrapperConfig
    from kvpolicies.engine.layer_view import LayerView
    from kvpolicies.engine.policy import Policy, PolicyConfig, Role, ScoreInputs, Signal
    from kvpolicies.engine.signals import Track
    from kvpolicies.integrations.models import load_model
    from kvpolicies.registry import (
        CodecInfo,
        PolicyInfo,
        get_codec,
        list_codecs,
        get_policy,
        list_policies,
        policy_with_role,
        reset_registry,
    )


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
    "Calibration",
    "CalibrationError",
    "Codec",
    "CodecInfo",
    "CompressedCache",
    "distribute",
    "GroupedCodec",
    "get_codec",
    "get_policy",
    "hookimpl",
    "KVPoliciesError",
    "list_policies",
    "LayerView",
    "list_codecs",
    "load_model",
    "ModelLoadError",
    "Policy",
    "PolicyConfig",
    "PluginError",
    "PolicyConfigError",
    "PolicyInfo",
    "PolicyRegistryError",
    "policy_with_role",
    "prepare_model",
    "reset_registry",
    "Role",
    "ScoreInputs",
    "ScorerWrapper",
    "Signal",
    "Track",
    "UnknownCodecError",
    "UnknownPolicyError",
    "UsageError",
    "WrapperConfig",
]
