"""L2-norm eviction (Devoto, Zhao, Scardapane, Minervini 2024, "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression", arXiv 2406.11430)."""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicies import Allocation, Policy, PolicyConfig, ScoreInputs, Signal, hookimpl


class L2NormConfig(PolicyConfig):
    uncompressed_layers: tuple[int, ...] = Field(
        (0, 1), description="layers kept whole (the paper skips the first two, where norm and attention disagree)"
    )
    keep_highest: bool = Field(False, description="ablation: keep the highest-norm keys instead of the lowest")


class L2Norm(Policy):
    """Keep the keys with the lowest L2 norm; attention-free, so it works with SDPA and FlashAttention.

    The paper observes that low-norm keys receive high attention. Layers in ``uncompressed_layers`` keep every
    entry, and what they hold counts against the same budget, so the other layers are cut harder than the
    nominal fraction. Scores are computed in fp32; equal norms (common in bf16) keep the older entry.
    """

    name = "l2norm"
    Config = L2NormConfig
    needs = frozenset({Signal.KEYS})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        norms = inputs.keys.float().norm(dim=-1)
        return norms if self.config.keep_highest else -norms

    def allocate(self, allocation: Allocation) -> Allocation:
        return allocation.with_full_layers(self.config.uncompressed_layers)


@hookimpl
def register_policies(register):
    register(L2Norm)
