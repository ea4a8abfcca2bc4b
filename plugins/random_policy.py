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
        """Draws on the device of the entries, from a generator of that device: nothing waits for or goes through
        the host. A device draws other numbers than the CPU for one seed, so runs agree within a device type."""
        batch, heads, seq = inputs.valid.shape
        device = inputs.valid.device
        scores = torch.empty(batch, heads, seq, device=device)
        for row, seen in enumerate(inputs.seen_tokens):  # `seen` is a host int: seeding reads nothing back
            generator = torch.Generator(device).manual_seed(hash((self.config.seed, inputs.layer_idx, seen)) % 2**62)
            draws = torch.rand(heads, max(seen, 1), generator=generator, device=device)
            scores[row] = draws.gather(1, inputs.order[row].clamp(min=0))
        return scores


@hookimpl
def register_policies(register):
    register(RandomEviction)
