"""ChunkKV (Liu et al. 2025, "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference", arXiv 2502.00299)."""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicies import ScoreInputs, hookimpl
from kvpolicies.engine.composition import ScorerWrapper, WrapperConfig


class ChunkKVConfig(WrapperConfig):
    scorer: str = Field("snapkv", description="policy whose score() ranks entries (the paper: SnapKV)")
    chunk_tokens: int = Field(10, ge=1, description="consecutive tokens kept or dropped together (the paper: 10)")


class ChunkKV(ScorerWrapper):
    """Keep whole chunks of consecutive tokens, ranked by the summed score of any scorer (SnapKV by default).

    Chunks are cut along each head's age order (the oldest ``chunk_tokens`` entries form the first chunk). Every
    entry gets its chunk's total, so selection takes chunks whole; only the last chunk admitted may be cut by the
    budget. Simplification: the paper shares chunk indices across the heads of a layer; here each KV head ranks its
    own chunks.
    """

    name = "chunkkv"
    Config = ChunkKVConfig

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        scores = self.scorer.score(inputs).float().masked_fill(~inputs.valid, 0.0)
        chunk = inputs.order.clamp(min=0) // self.config.chunk_tokens
        totals = torch.zeros_like(scores).scatter_add_(-1, chunk, scores)
        return totals.gather(-1, chunk)


@hookimpl
def register_policies(register):
    register(ChunkKV)
