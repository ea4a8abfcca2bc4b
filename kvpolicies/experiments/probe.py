"""Looking inside one forward pass: the post-RoPE queries and keys of every layer, for analyses and probes.

Keys come from an ordinary ``DynamicCache``; queries are recorded by a temporary attention implementation that
wraps the model's own, so the forward computes exactly what it always does.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvpolicies.engine.attention import recording_queries


@torch.no_grad()
def queries_and_keys(model, ids: torch.Tensor, rows: int) -> tuple[dict[int, torch.Tensor], DynamicCache]:
    """Run ``ids`` (``[1, seq]``); return each layer's last ``rows`` queries ``[1, heads, rows, head_dim]`` and the
    filled cache (keys ``[1, kv_heads, seq, head_dim]`` per layer), both after RoPE."""
    cache = DynamicCache(config=model.config)
    with recording_queries(model, lambda query: query[:, :, -rows:].clone()) as queries:
        model(ids.to(model.device), cache=cache)
    return dict(queries), cache
