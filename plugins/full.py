"""The reference: no eviction at all."""

from __future__ import annotations

import torch

from kvpolicies import Policy, PolicyConfig, Role, ScoreInputs, hookimpl


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
