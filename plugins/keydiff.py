"""KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", arXiv 2504.15364)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpolicies import Policy, PolicyConfig, ScoreInputs, Signal, hookimpl


class KeyDiffConfig(PolicyConfig):
    pass


class KeyDiff(Policy):
    """Keep the keys least similar (cosine) to the mean key of their head; attention-free.

    The mean is the mean of the normalised keys currently held by the head (padding excluded). Distinctive keys are
    kept, near-duplicates of the average are dropped first.
    """

    name = "keydiff"
    Config = KeyDiffConfig
    needs = frozenset({Signal.KEYS})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        keys = F.normalize(inputs.keys.float(), dim=-1) * inputs.valid[..., None]
        anchor = F.normalize(keys.sum(dim=2, keepdim=True), dim=-1)
        return -(keys * anchor).sum(-1)


@hookimpl
def register_policies(register):
    register(KeyDiff)
