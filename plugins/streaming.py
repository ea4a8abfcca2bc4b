"""StreamingLLM: attention sinks plus a recent window (Xiao et al. 2024, "Efficient Streaming Language Models with
Attention Sinks")."""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicies import Policy, PolicyConfig, ScoreInputs, hookimpl


class StreamingConfig(PolicyConfig):
    sink_tokens: int = Field(4, ge=0, description="first real tokens always kept (the paper uses 4)")


class Streaming(Policy):
    """Keep the first tokens (sinks) and fill the rest of the budget with the most recent ones.

    The window is not a fixed size: it is whatever the budget leaves after the sinks, so it follows the budget.
    """

    name = "streaming"
    Config = StreamingConfig

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.order.float()


@hookimpl
def register_policies(register):
    register(Streaming)
