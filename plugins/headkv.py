"""Head-level budgets: AdaKV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation", arXiv 2407.11550) and HeadKV (Fu et al. 2024, "Not All Heads Matter: A Head-Level KV Cache
Compression Method with Integrated Retrieval and Reasoning", arXiv 2410.19258)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from kvpolicies import Allocation, BudgetError, hookimpl
from kvpolicies.engine.composition import ScorerWrapper, WrapperConfig
from kvpolicies.experiments.head_scores import load_head_scores


class HeadKVConfig(WrapperConfig):
    scorer: str = Field("snapkv", description="policy whose score() ranks entries (the paper: SnapKV)")
    allocation: Literal["adaptive", "static"] = Field(
        "adaptive", description="adaptive: AdaKV, from the scores of each layer; static: HeadKV, from head_scores"
    )
    floor_fraction: float = Field(
        0.2, ge=0, le=1, description="each head keeps at least this share of its uniform allocation"
    )
    head_scores: Path | None = Field(None, description="JSON from `kvpolicies head-scores` (static allocation)")

    @model_validator(mode="after")
    def _static_needs_scores(self) -> HeadKVConfig:
        if self.allocation == "static" and self.head_scores is None:
            raise ValueError("allocation='static' needs head_scores=FILE; make one with `kvpolicies head-scores`")
        if self.head_scores is not None:
            load_head_scores(self.head_scores)  # a missing or broken file fails here, before any model runs
        return self


class HeadKV(ScorerWrapper):
    """Give each KV head its own budget: adaptively from the scores (AdaKV) or from measured head importance (HeadKV).

    ``adaptive``: within each layer, every head first keeps its top ``floor_fraction`` share of the uniform
    allocation; the rest of the layer's entries go to the highest scores across all of its heads, so heads with
    concentrated attention give entries to heads with spread-out attention. Layer totals stay uniform.
    ``static``: the whole budget is spread over all (layer, KV head) pairs in proportion to retrieval scores
    measured once on a passkey probe (``kvpolicies head-scores``), above the same per-head floor. Entries within a
    head are ranked by ``scorer`` (SnapKV by default). The cache stores the ragged per-head runs: memory is really
    saved. Simplification: HeadKV's retrieval-reasoning score is replaced by the plain retrieval score (how often a
    head's strongest attention lands on the needle token being copied).
    """

    name = "headkv"
    Config = HeadKVConfig

    def identity(self) -> dict[str, Any]:
        """With the head-scores file's content hash: new scores at the same path make new cells, not stale ones."""
        identity = super().identity()
        if self.config.head_scores is not None:
            identity["head_scores_sha256"] = hashlib.sha256(Path(self.config.head_scores).read_bytes()).hexdigest()
        return identity

    def allocate(self, allocation: Allocation) -> Allocation:
        allocation = self.scorer.allocate(allocation)
        if self.config.allocation == "adaptive":
            return allocation
        scores = load_head_scores(self.config.head_scores)
        if scores.shape != allocation.tokens.shape:
            raise BudgetError(
                f"{self.config.head_scores} holds scores for {tuple(scores.shape)} (layers, KV heads), but this model "
                f"has {tuple(allocation.tokens.shape)}; compute them for this model with `kvpolicies head-scores`"
            )
        uniform = allocation.free_total / max(len(allocation.free_layers) * allocation.tokens.shape[1], 1)
        floor = max(1, math.floor(self.config.floor_fraction * uniform))
        return allocation.redistribute(scores, floor=floor)

    def reallocate_heads(self, scores: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.config.allocation != "adaptive":
            return keep
        keep = keep.to(scores.device)
        count = valid.sum(-1)
        floor = torch.minimum((keep * self.config.floor_fraction).ceil().long().clamp(min=1), count)
        ranked = scores.float().masked_fill(~valid, float("-inf"))
        # Guarantee each head its floor by ranking its best entries above everything else. Protected tokens need
        # no help here: select() keeps them first within whatever count a head ends up with.
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
        rank_in_head = torch.empty_like(order).scatter_(
            -1, order, torch.arange(valid.shape[-1], device=valid.device).expand_as(order)
        )
        ranked = ranked.masked_fill(valid & (rank_in_head < floor[..., None]), float("inf"))
        batch, heads, seq = ranked.shape
        best, flat = torch.sort(ranked.view(batch, heads * seq), dim=-1, descending=True, stable=True)
        chosen = (torch.arange(heads * seq, device=valid.device)[None] < keep.sum(-1, keepdim=True)) & (best > -1e30)
        moved = torch.zeros_like(keep).scatter_add_(1, flat // seq, chosen.long())
        # Protected tokens beyond a tiny budget can crowd a head out entirely: keep the uniform split there.
        return torch.where((moved >= 1).all(-1, keepdim=True), moved, keep)


@hookimpl
def register_policies(register):
    register(HeadKV)
