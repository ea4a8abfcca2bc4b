"""The kvpolicies attention: the model's own attention for full layers, SDPA over packed runs for compressed ones.

It is registered with transformers' ``AttentionInterface`` under ``kvpolicies-<inner>`` (``kvpolicies-sdpa`` by
default), where ``<inner>`` is the implementation the model used before. Layers that hold every token call
``<inner>`` unchanged, so an uncompressed forward is bit-for-bit the model's own. Packed layers hold a different
number of entries than the logical sequence, and possibly one per head, so their mask comes from the cache layout
rather than from the model. After the attention has read a layer's keys, the layer may evict.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpolicies.engine.signals import LogitScale
from kvpolicies.engine.storage import CompressedLayer, claim_layer
from kvpolicies.errors import ModelLoadError

PREFIX = "kvpolicies-"


def prepare_model(model) -> None:
    """Switch ``model`` to the kvpolicies attention wrapping its current implementation (idempotent).

    A model running the kvpolicies attention behaves exactly as before with any other cache.
    """
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return
    name = register_attention(current)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ModelLoadError(
            f"{type(model).__name__} cannot switch its attention implementation, so KV entries cannot be evicted; "
            "kvpolicies supports models written with transformers' AttentionInterface (Llama, Qwen2, Mistral, ...)"
        )


def register_attention(inner: str) -> str:
    """Register ``kvpolicies-<inner>`` (attention and mask functions) and return its name."""
    name = PREFIX + inner
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        if inner not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise ModelLoadError(
                f"attention implementation {inner!r} is not supported by kvpolicies; "
                f"use one of {sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)}"
            )

        def attention(module, query, key, value, attention_mask, **kwargs):
            return kvpolicies_attention(inner_function(inner, module), module, query, key, value, attention_mask, **kwargs)

        ALL_ATTENTION_FUNCTIONS.register(name, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def inner_function(inner: str, module) -> Callable:
    if inner == "eager":
        # Eager attention is defined per model family, next to the attention module.
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS[inner]


def kvpolicies_attention(inner: Callable, module, query, key, value, attention_mask, **kwargs):
    """Attention for one layer; ``query`` is ``[batch, heads, q_len, head_dim]``, output ``[batch, q_len, heads, d]``."""
    layer = claim_layer(key)
    if layer is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("s_aux") is not None:  # GPT-OSS: a learned sink logit per head joins every softmax
        raise ModelLoadError(f"{type(module).__name__} adds learned attention sinks (s_aux) to its softmax, which "
                             "kvpolicies' attention over compressed layers does not compute; this model is not "
                             "supported")
    q_len = query.shape[2]
    scale = LogitScale(kwargs.get("scaling") or query.shape[-1] ** -0.5, kwargs.get("softcap"))
    # One new token is real and sees itself (generation extends the mask with ones): reading the mask would cost a
    # host-device sync per layer per decoding step for nothing. A one-token forward must therefore carry no padding:
    # chunked prefill takes chunks of 2 tokens at least for that reason.
    new_visible = None if q_len == 1 else new_token_mask(attention_mask, query.shape[0], q_len, query.device)
    if layer.packed:
        dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
        output = packed_attention(query, layer, new_visible, scale, dropout), None
    else:
        output = inner(module, query, key, value, attention_mask, **kwargs)
    new_valid = None if new_visible is None else new_visible.diagonal(dim1=1, dim2=2)
    layer.after_attention(query, new_valid, scale, module)
    return output


def new_token_mask(attention_mask, batch: int, q_len: int, device) -> torch.Tensor | None:
    """Which new tokens each new query may see, ``[batch, q_len, q_len]`` bool, or None for plain causality.

    Read from the model's mask in whatever format its attention uses: 4D bool (sdpa), 4D additive float (eager) or
    2D padding mask (flash attention). Its last ``q_len`` key columns are the new tokens.
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim == 2:
        real = attention_mask[:, -q_len:].bool()
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        return causal[None] & real[:, None, :]
    if attention_mask.ndim != 4:
        raise ValueError(f"unsupported attention mask with shape {tuple(attention_mask.shape)}")
    block = attention_mask[:, 0, :, -q_len:]
    if block.dtype != torch.bool:
        block = block > torch.finfo(block.dtype).min / 2
    return block.expand(batch, q_len, q_len)


def packed_attention(
    query: torch.Tensor, layer: CompressedLayer, new_visible: torch.Tensor | None, scale: LogitScale, dropout: float
) -> torch.Tensor:
    """SDPA of ``query`` over the layer's packed runs; returns ``[batch, q_len, heads, head_dim]``.

    The query heads sharing a KV head are folded into the query rows, so GQA needs no copy of the keys. A run sees
    all its old entries and, among its newest ``q_len`` entries, what ``new_visible`` allows (causal by default).
    A soft-capped layer (Gemma 2) cannot use SDPA, which has no soft-cap: it runs the eager computation instead.
    """
    attend = partial(softcapped_attention, softcap=scale.softcap) if scale.softcap else F.scaled_dot_product_attention
    scaling = scale.scaling
    batch, heads, q_len, head_dim = query.shape
    kv_heads = layer.num_heads
    groups = heads // kv_heads
    rows = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    if new_visible is None and q_len > 1:
        new_visible = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril().expand(batch, -1, -1)
    if new_visible is not None and bool(new_visible.all()):
        new_visible = None

    def mask_for(length: int, visible: torch.Tensor | None) -> torch.Tensor | None:
        """``[..., groups * q_len, length]`` for ``visible`` of shape ``[..., q_len, q_len]``."""
        if visible is None:
            return None
        old = torch.ones(*visible.shape[:-1], length - q_len, dtype=torch.bool, device=visible.device)
        full = torch.cat([old, visible], dim=-1)
        return full.tile(*([1] * (full.ndim - 2)), groups, 1)  # rows are (group, query)

    if (uniform := layer.uniform_view()) is not None:
        keys, values = uniform
        mask = mask_for(keys.shape[2], None if new_visible is None else new_visible[:, None])
        out = attend(rows, keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling)
    else:
        out = torch.empty_like(rows)
        for b, h, k, v in layer.runs():
            mask = mask_for(k.shape[0], None if new_visible is None else new_visible[b])
            # 4-D inputs: with 3-D ones SDPA on CPU falls back to its math path (bmm + softmax), 1.5x slower.
            out[b, h] = attend(
                rows[b, h][None, None], k[None, None], v[None, None], attn_mask=mask, dropout_p=dropout,
                scale=scaling,
            )[0, 0]
    return out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()


def softcapped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
    scale: float, softcap: float,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` with the logits soft-capped, computed as the models' eager attention does:
    in the inputs' dtype, softmax in float32."""
    logits = LogitScale(scale, softcap).apply_(query @ key.transpose(-1, -2))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    weights = logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    return F.dropout(weights, p=dropout_p, training=dropout_p > 0) @ value
