"""Looking inside one forward pass: the post-RoPE queries and keys of every layer, for analyses and probes.

Keys come from an ordinary ``DynamicCache``; queries are recorded by a temporary attention implementation that
wraps the model's own, so the forward computes exactly what it always does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpolicies.engine.attention import PREFIX, inner_function

RECORDER = "kvpolicies-probe"


@contextmanager
def _recording(model, rows: int):
    previous = model.config._attn_implementation
    inner = previous.removeprefix(PREFIX)
    queries: dict[int, torch.Tensor] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        queries[module.layer_idx] = query[:, :, -rows:].detach()
        return inner_function(inner, module)(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(RECORDER, record)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RECORDER, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    model.set_attn_implementation(RECORDER)
    try:
        yield queries
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def queries_and_keys(model, ids: torch.Tensor, rows: int) -> tuple[dict[int, torch.Tensor], DynamicCache]:
    """Run ``ids`` (``[1, seq]``); return each layer's last ``rows`` queries ``[1, heads, rows, head_dim]`` and the
    filled cache (keys ``[1, kv_heads, seq, head_dim]`` per layer), both after RoPE."""
    cache = DynamicCache(config=model.config)
    with _recording(model, rows) as queries:
        model(ids.to(model.device), cache=cache)
    return dict(queries), cache
