"""The reference: no eviction at all, and entries stored as the model computed them (the ``full`` codec)."""

from __future__ import annotations

import torch

from kvpolicies import Policy, PolicyConfig, Role, ScoreInputs, hookimpl
from kvpolicies.engine.codecs import FullPrecision


class FullConfig(PolicyConfig):
    pass


class FullCache(Policy):
    """Keep every entry (the uncompressed reference; ignores the budget)."""

    name = "full"
    Config = FullConfig
    compresses = False
    role = Role.REFERENCE

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return torch.zeros(inputs.valid.shape, device=inputs.valid.device)


@hookimpl
def register_policies(register):
    register(FullCache)


@hookimpl
def register_codecs(register):
    register(FullPrecision)
