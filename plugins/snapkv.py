"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kvpolicies import Policy, PolicyConfig, ScoreInputs, Signal, hookimpl


class SnapKVConfig(PolicyConfig):
    window_tokens: int = Field(32, ge=0, description="most recent tokens always kept (the observation window)")
    observation_tokens: int = Field(32, ge=1, description="last queries that vote for the entries to keep")
    kernel_size: int = Field(7, ge=1, description="width of the pooling that keeps neighbours of voted tokens")
    pooling: Literal["max", "avg"] = Field("max", description="pooling of the votes along the sequence")


class SnapKV(Policy):
    """Keep the entries the last prompt queries attend to most (pooled), plus that observation window.

    The last ``observation_tokens`` queries "vote": each entry's score is the attention it receives from them,
    summed over the query heads that share its KV head, then max- (or avg-) pooled along the sequence so the
    neighbours of a voted token survive with it. When the question ends the prompt, the votes come from the
    question: the policy is question-aware by construction. During decoding the votes come from the last
    ``observation_tokens`` queries seen (prompt and generated), kept in a small per-layer buffer.
    Simplification: votes are summed over heads of a group (the paper's code averages; the ranking is the same).
    """

    name = "snapkv"
    Config = SnapKVConfig
    needs = frozenset({Signal.ATTENTION})

    @property
    def query_window(self) -> int:
        return self.config.observation_tokens

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return pool_votes(inputs.attention.masked_fill(~inputs.valid, 0.0), self.config.kernel_size, self.config.pooling)


def pool_votes(votes: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Pool ``[batch, kv_heads, seq]`` votes along ``seq`` with a centred window of ``kernel_size``."""
    if kernel_size <= 1:
        return votes
    batch, heads, seq = votes.shape
    flat = votes.reshape(batch * heads, 1, seq)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(F.pad(flat, (kernel_size // 2, (kernel_size - 1) // 2), value=0.0), kernel_size, stride=1)
    return pooled.view(batch, heads, seq)


@hookimpl
def register_policies(register):
    register(SnapKV)
