"""Every error kvpolicies raises for bad input, under one base class.

The command line prints any :class:`KVPoliciesError` as ``kvpolicies: error: <message>`` and exits 2, so a message
must say what was wrong and how to fix it; a traceback is reserved for bugs. This module imports nothing heavy, so
the command line can catch these errors without loading torch.
"""

from __future__ import annotations

import sys
from typing import Any


class KVPoliciesError(Exception):
    """Bad input (an option, a file, a model, a plugin); the message names the problem and the fix."""


class UsageError(KVPoliciesError, ValueError):
    """A command-line argument or input file that cannot be used as given."""


class BudgetError(KVPoliciesError, ValueError):
    """A budget that cannot be read, or cannot be honoured for this model, sequence and policy."""


class PolicyConfigError(KVPoliciesError, ValueError):
    """A policy was given a config it does not accept (a policy's code that breaks a hook's contract is a
    :class:`PluginError`)."""


class UnknownPolicyError(KVPoliciesError, KeyError):
    """No installed plugin registers a policy of that name."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class UnknownCodecError(KVPoliciesError, KeyError):
    """No installed plugin registers a storage codec of that name."""

    def __str__(self) -> str:
        return str(self.args[0])


class PolicyRegistryError(KVPoliciesError, RuntimeError):
    """The installed plugins contradict each other."""


class ModelLoadError(KVPoliciesError, OSError):
    """A model that cannot be found or loaded, or an architecture kvpolicies cannot compress."""


class ModelUnavailable(ModelLoadError):
    """A model that could not be loaded at all (missing, unreachable, unsupported): every cell of it would fail
    alike, so a sweep stops at the first. A policy that cannot run on a model raises a plain ModelLoadError: that
    policy's cells fail, the others run."""


class CalibrationError(KVPoliciesError):
    """A policy could not calibrate on a model (out of memory, attention it cannot read, a bug in its
    ``calibrate``): that policy's cells fail, the model itself is fine for the others. It carries the model and
    tokenizer already loaded, so a sweep keeps them for its next cell instead of loading them again; the cause is
    chained as ``__cause__``."""

    def __init__(self, message: str, model: object = None, tokenizer: object = None) -> None:
        super().__init__(message)
        self.model = model
        self.tokenizer = tokenizer


class PluginError(KVPoliciesError):
    """A policy plugin's own code raised inside a hook the engine called (``score``, ``allocate``, ...), or a hook
    returned something that breaks its contract (scores of the wrong shape or with NaN, an allocation that adds
    entries, ...).

    The message names the policy, the hook, the plugin and its package, and what went wrong: the original exception,
    which is chained as ``__cause__`` so that ``kvpolicies --debug`` can show its traceback, or the contract broken
    and what the hook must return instead. The bug is in the plugin, and its authors need both.
    """


class PluginWarning(UserWarning):
    """A plugin could not be loaded or was skipped; the rest of the registry works."""


class ContextLengthWarning(UserWarning):
    """A sequence ran past the positions the model was trained for."""


def describe(validation_error: Any, with_input: bool = False) -> str:
    """A pydantic ``ValidationError`` as one line a user can act on: ``field: problem; field: problem``, each
    problem followed by the offending value with ``with_input`` (``lengths.0: ... (got -100)``)."""
    return "; ".join(
        ": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, "))))
        + (f" (got {e['input']!r})" if with_input and e["type"] != "missing" else "")
        for e in validation_error.errors()
    )


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device ran out of memory: torch's error (CUDA's), Python's, or the CPU allocator's
    (a plain RuntimeError). Such a failure is the machine's, not the input's or a plugin's, and a later try with
    more memory free may pass. Reads torch's error class only if torch is imported already."""
    if isinstance(error, KVPoliciesError):  # ours may speak of memory budgets: they are the input's
        return False
    torch = sys.modules.get("torch")
    kind = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(error, MemoryError) or (kind is not None and isinstance(error, kind)):
        return True
    text = str(error).lower()  # what torch's allocators raise as a plain RuntimeError
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
