"""Uniformly random eviction: the chance baseline a policy must beat."""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicies import Policy, PolicyConfig, Role, ScoreInputs, hookimpl


class RandomConfig(PolicyConfig):
    seed: int = Field(0, description="seed of the draws; runs with one seed are identical")


class RandomEviction(Policy):
    """Keep a uniformly random subset of each head's entries (seeded, reproducible).

    The draw for an entry depends on the seed, the layer, the sequence's real length and the entry's age rank, not
    on its batch neighbours or padding, so a sequence keeps the same set alone or in a padded batch.
    """

    name = "random"
    role = Role.CHANCE
    Config = RandomConfig

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        batch, heads, seq = inputs.valid.shape
        scores = torch.empty(batch, heads, seq)
        for row, seen in enumerate(inputs.seen_tokens):
            generator = torch.Generator().manual_seed(hash((self.config.seed, inputs.layer_idx, seen)) % 2**62)
            draws = torch.rand(heads, max(seen, 1), generator=generator)
            scores[row] = draws.gather(1, inputs.order[row].clamp(min=0).cpu())
        return scores.to(inputs.valid.device)


@hookimpl
def register_policies(register):
    register(RandomEviction)
