"""CriticalKV (Feng et al. 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective", arXiv 2502.03805)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kvpolicies import PolicyConfig, PolicyConfigError, ScoreInputs, Signal, hookimpl
from kvpolicies.engine.composition import ScorerWrapper, WrapperConfig


class CriticalKVConfig(WrapperConfig):
    scorer: str = Field("tova", description="attention-like policy whose scores are rescaled (non-negative scores)")
    epsilon: float = Field(1e-4, ge=0, description="added to the normalised scores before rescaling")


class CriticalKV(ScorerWrapper):
    """Rescale an attention-like scorer by how far each value moves the output: ``score × ‖W_o v‖``.

    An entry's contribution to the layer output is its attention weight times its value projected by the output
    matrix, so a value with a small projected norm can be dropped even if attended. Scores of the inner policy
    (TOVA by default) are normalised per head to sum to one, ``epsilon`` is added, and the result is multiplied by
    ``‖W_o^(j) v‖`` averaged over the query heads ``j`` sharing the KV head. Protected (+inf) scores stay +inf.
    Simplification: the paper's two-stage selection (a first cut by attention, then the rescaled ranking) is
    folded into this single rescaled ranking.
    """

    name = "criticalkv"
    Config = CriticalKVConfig

    def __init__(self, config: PolicyConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.needs = self.scorer.needs | {Signal.VALUES}

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        base = self.scorer.score(inputs).float().masked_fill(~inputs.valid, 0.0)
        finite = torch.isfinite(base)
        if (base[finite & inputs.valid] < 0).any():
            raise PolicyConfigError(
                f"criticalkv rescales non-negative, attention-like scores; scorer {self.config.scorer!r} returns "
                "negative ones (use tova, snapkv, h2o, ...)"
            )
        base = torch.where(finite, base, 0.0)
        normalised = base / base.sum(-1, keepdim=True).clamp(min=1e-12) + self.config.epsilon
        rescaled = normalised * projected_value_norms(inputs.values, inputs.layer.output_projection)
        return torch.where(finite, rescaled, float("inf"))


def projected_value_norms(values: torch.Tensor, output_projection: torch.Tensor) -> torch.Tensor:
    """``‖W_o^(j) v‖`` averaged over the query heads sharing each KV head: ``[batch, kv_heads, seq]`` float32.

    Computed in the Gram form ``‖W v‖² = vᵀ (WᵀW) v``: per query head a ``[head_dim, head_dim]`` matrix, so memory
    is a few copies of ``values`` in float32, never the ``[batch, kv_heads, groups, seq, hidden]`` projections
    (17 GB per layer at 32k tokens on a Llama-3-8B shape). ``values``: ``[batch, kv_heads, seq, head_dim]``;
    ``output_projection``: ``[hidden, heads * head_dim]``.
    """
    batch, kv_heads, seq, head_dim = values.shape
    hidden = output_projection.shape[0]
    groups = output_projection.shape[1] // head_dim // kv_heads
    weight = output_projection.view(hidden, kv_heads, groups, head_dim)
    gram = torch.stack([  # W_jᵀ W_j per query head: [kv_heads, groups, head_dim, head_dim]
        torch.einsum("ogd,oge->gde", columns, columns) for columns in (weight[:, h].float() for h in range(kv_heads))
    ])  # one KV head's columns in float32 at a time, not a float32 copy of W_o
    values = values.float()
    norms = torch.zeros(batch, kv_heads, seq, dtype=torch.float32, device=values.device)
    for g in range(groups):  # one query head of each group at a time: [b, h, s, d] temporaries only
        squared = (torch.einsum("bhsd,hde->bhse", values, gram[:, g]) * values).sum(-1)
        norms += squared.clamp_(min=0).sqrt_()
    return norms / groups


@hookimpl
def register_policies(register):
    register(CriticalKV)
