"""LagKV (Liang et al. 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important",
arXiv 2504.04704)."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from kvpolicies import Policy, PolicyConfig, ScoreInputs, Signal, hookimpl


class LagKVConfig(PolicyConfig):
    sink_tokens: int = Field(16, ge=0, description="first real tokens always kept (the paper: 16)")
    lag_tokens: int = Field(128, ge=2, description="partition size; each is judged against the next one")


class LagKV(Policy):
    """Keep the tokens whose keys and values deviate most from the range of the following partition; attention-free.

    After the sinks, each head's entries are cut into partitions of ``lag_tokens`` in age order. Each partition is
    min-max normalised per channel with the statistics of the *next* partition; a token's score is the standard
    deviation of its normalised key plus that of its normalised value, softmaxed within its partition so partitions
    compete on equal terms. The newest entries, whose partition has no successor yet, score +inf (kept), as in the
    paper.
    """

    name = "lagkv"
    Config = LagKVConfig
    needs = frozenset({Signal.KEYS, Signal.VALUES})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        valid, order = inputs.valid, inputs.order
        batch, heads, seq = valid.shape
        lag, sinks = self.config.lag_tokens, self.config.sink_tokens
        # Entries re-laid in age order after the sinks: slot (order - sinks) of a [.., chunks * lag] grid.
        chunks = max(1, math.ceil(max(seq - sinks, 1) / lag))
        if chunks == 1:  # no partition has a successor to judge it by: every entry scores +inf, as the grid below
            return torch.full((batch, heads, seq), float("inf"), device=valid.device)  # would give (ties: older kept)
        slot = torch.where(valid & (order >= sinks), order - sinks, chunks * lag)  # out-of-grid -> dump slot
        grid_valid = torch.zeros(batch, heads, chunks * lag + 1, dtype=torch.bool, device=valid.device)
        grid_valid.scatter_(-1, slot, valid & (order >= sinks))
        grid_valid = grid_valid[..., :-1].view(batch, heads, chunks, lag)
        deviation = 0.0
        for states in (inputs.keys, inputs.values):
            dim = states.shape[-1]
            grid = states.float().new_zeros(batch, heads, chunks * lag + 1, dim)
            grid.scatter_(2, slot[..., None].expand(-1, -1, -1, dim), states.float())
            grid = grid[:, :, :-1].view(batch, heads, chunks, lag, dim)
            low = grid.masked_fill(~grid_valid[..., None], float("inf")).amin(dim=3, keepdim=True)
            high = grid.masked_fill(~grid_valid[..., None], float("-inf")).amax(dim=3, keepdim=True)
            # Reference statistics: those of the next partition.
            ref_low, ref_high = low[:, :, 1:], high[:, :, 1:]
            span = (ref_high - ref_low).clamp(min=1e-6)
            normalised = (grid[:, :, :-1] - ref_low) / span
            deviation = deviation + normalised.std(dim=-1)
        judged = grid_valid[:, :, 1:].all(dim=-1, keepdim=True) & grid_valid[:, :, :-1]  # successor complete
        weights = torch.softmax(deviation.masked_fill(~judged, float("-inf")), dim=-1).nan_to_num(0.0)
        scores = torch.full((batch, heads, chunks, lag), float("inf"), device=valid.device)
        scores[:, :, :-1] = torch.where(judged, weights, torch.full_like(weights, float("inf")))
        flat = torch.cat([scores.view(batch, heads, -1), scores.new_zeros(batch, heads, 1)], dim=-1)
        return flat.gather(-1, slot)


@hookimpl
def register_policies(register):
    register(LagKV)
