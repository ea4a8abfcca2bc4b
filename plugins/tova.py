"""TOVA: Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104)."""

from __future__ import annotations

import torch

from kvpolicies import Policy, PolicyConfig, ScoreInputs, Signal, hookimpl


class TOVAConfig(PolicyConfig):
    pass


class TOVA(Policy):
    """Keep the entries the newest query attends to most, averaged over the query heads sharing each KV head.

    At prefill the newest query is the prompt's last token; during decoding it is the token just generated, so every
    eviction re-scores the whole cache with the current query. Simplification: the paper evicts exactly one token
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
        return inputs.attention


@hookimpl
def register_policies(register):
    register(TOVA)
