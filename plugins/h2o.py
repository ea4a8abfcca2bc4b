"""H2O: heavy hitters plus recent tokens (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", arXiv 2306.14048)."""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicies import Policy, PolicyConfig, ScoreInputs, Signal, hookimpl


class H2OConfig(PolicyConfig):
    recent_fraction: float = Field(
        0.5, ge=0, le=1, description="share of each head's budget kept for the newest tokens (the paper: half)"
    )


class H2O(Policy):
    """Keep the entries that have received the most attention so far (heavy hitters) and the most recent ones.

    An entry's score is the attention it has accumulated from every query since it entered the cache: the prompt's
    queries at prefill (causal, so older tokens have more chances), then each generated token's. The newest
    ``recent_fraction`` of each head's budget is kept regardless. Cost: the accumulation needs q·Kᵀ for every
    forward pass in every layer, on top of the attention itself (computed in query chunks, never as a full
    ``seq × seq`` matrix, and never by switching the model to eager attention).
    Simplification: attention is summed over the query heads sharing a KV head (GQA), as the paper had none.
    """

    name = "h2o"
    Config = H2OConfig
    needs = frozenset({Signal.CUMULATIVE_ATTENTION})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        recent = (inputs.keep.to(inputs.order.device) * self.config.recent_fraction).floor().long()
        count = inputs.valid.sum(-1)
        is_recent = inputs.valid & (inputs.order >= (count - recent)[..., None])
        return inputs.cumulative_attention.masked_fill(is_recent, float("inf"))


@hookimpl
def register_policies(register):
    register(H2O)
