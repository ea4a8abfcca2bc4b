"""The kvpolicies attention: the model's own attention for full layers, SDPA over packed runs for compressed ones.

It is registered with transformers' ``AttentionInterface`` under ``kvpolicies-<inner>`` (``kvpolicies-sdpa`` by
default), where ``<inner>`` is the implementation the model used before. Layers that hold every token call
``<inner>`` unchanged, so an uncompressed forward is bit-for-bit the model's own. Packed layers hold a different
number of entries than the logical sequence, and possibly one per head, so their mask comes from the cache layout
rather than from the model. After the attention has read a layer's keys, the layer may evict.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpolicies.engine.paths import launch_bound
from kvpolicies.engine.signals import LogitScale
from kvpolicies.engine.storage import CompressedLayer, RowLayers, claim_layer
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


RECORDER = "kvpolicies_recorder"  # not PREFIX: a model recording is not one prepared for compressed caches
_RECORDINGS = itertools.count()


@contextmanager
def recording_queries(model, pick: Callable[[torch.Tensor], torch.Tensor],
                      scales: dict[int, LogitScale] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """While inside, each layer's forward stores ``pick(query)`` (the post-RoPE ``[batch, heads, q_len, head_dim]``)
    under its layer index, and into ``scales`` how that layer turns ``q·k`` into logits, as the model passed it;
    a temporary attention implementation wraps the model's own, so the forward computes exactly what it always
    does. Meant for a forward over an ordinary cache (or none), never a compressed one. ``pick`` should copy what
    it keeps (a slice would hold the whole query alive)."""
    previous = model.config._attn_implementation
    inner = previous.removeprefix(PREFIX)  # a recording inside another reads through the outer one
    name = f"{RECORDER}-{next(_RECORDINGS)}"  # its own name: recordings nest, and none outlives its block
    queries: dict[int, torch.Tensor] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        queries[module.layer_idx] = pick(query).detach()
        if scales is not None:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            scales[module.layer_idx] = LogitScale(scaling, kwargs.get("softcap"))
        return inner_function(inner, module)(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(name, record)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    try:
        model.set_attn_implementation(name)
        yield queries
    finally:
        try:
            model.set_attn_implementation(previous)
        finally:
            for functions in (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS):
                functions._global_mapping.pop(name, None)  # the closure holds what it recorded


def kvpolicies_attention(inner: Callable, module, query, key, value, attention_mask, **kwargs):
    """Attention for one layer; ``query`` is ``[batch, heads, q_len, head_dim]``, output ``[batch, q_len, heads, d]``."""
    claimed = claim_layer(key)
    if claimed is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    cache, layer = claimed
    if isinstance(layer, RowLayers):  # caches decoded as one batch, one token each: each row reads its own
        return torch.cat([attend(inner, module, query[row : row + 1], keys, values, None, owner, own, **kwargs)[0]
                          for row, (owner, own, keys, values)
                          in enumerate(zip(layer.owners, layer.layers, layer.keys, layer.values))]), None
    return attend(inner, module, query, key, value, attention_mask, cache, layer, **kwargs)


def attend(inner: Callable, module, query, key, value, attention_mask, cache, layer: CompressedLayer, **kwargs):
    """The attention of ``layer`` of ``cache``, which its update just returned ``key`` and ``value`` from; then the
    cache decides what the layer keeps. A row decoded with others (:mod:`kvpolicies.engine.rows`) comes without a
    mask: its one new token sees every entry its layer holds, as it would alone."""
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
    else:  # a window's oldest group may hold entries that slid out, stored until the group goes: never attended
        key, value = (key, value) if not layer.hidden else (key[:, :, layer.hidden:], value[:, :, layer.hidden:])
        output = inner(module, query, key, value, attention_mask, **kwargs)
    new_valid = None if new_visible is None else new_visible.diagonal(dim1=1, dim2=2)
    cache.after_attention(layer, query, new_valid, scale, module)
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
    """Attention of ``query`` over the layer's packed runs, one kernel call whatever the batch and head count;
    returns ``[batch, q_len, heads, head_dim]``.

    The query heads sharing a KV head are folded into the query rows, so GQA needs no copy of the keys. A run sees
    all its old entries and, among its newest ``q_len`` entries, what ``new_visible`` allows (causal by default).
    Runs of one length are the dense layout already (a free view). Ragged runs (per-head budgets, a padded batch)
    take a variable-length kernel where one serves (:func:`varlen_decode`); else, where launches are what costs
    (:func:`launch_bound`), their padded view with a mask from the run lengths: a copy of the layer per step,
    traded for ``batch × kv_heads`` calls; on a CPU, where a call costs little and the copy much, one call per
    block of runs (:func:`run_by_run`).
    A soft-capped layer (Gemma 2) cannot use SDPA, which has no soft-cap: it runs the eager computation instead.
    A packed sliding-window layer also hides from each query the entries outside its window, read from the entries'
    positions on the device (the variable-length kernel takes no such mask, so it pads).
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads = layer.num_heads
    groups = heads // kv_heads
    rows = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    if new_visible is None and q_len > 1:
        new_visible = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril().expand(batch, -1, -1)
    if new_visible is not None and bool(new_visible.all()):
        new_visible = None
    windowed = layer.positions is not None
    if (uniform := layer.uniform_view()) is not None:
        keys, values = uniform
        mask = None
        if new_visible is not None:
            old = torch.ones(batch, 1, q_len, keys.shape[2] - q_len, dtype=torch.bool, device=query.device)
            mask = torch.cat([old, new_visible[:, None]], dim=-1)
        if windowed:
            window = layer.window_view(layer.positions.view(batch, kv_heads, -1), q_len)
            sees = window.visible(0, q_len, keys.shape[2])
            mask = sees if mask is None else mask & sees
    elif q_len == 1 and not windowed and (out := varlen_decode(rows, layer, scale, dropout)) is not None:
        return out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()
    elif not launch_bound(rows.device):
        out = run_by_run(rows, layer, new_visible, scale, dropout, groups)
        return out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()
    else:
        keys, values, valid, positions = padded_runs(layer)
        mask = ragged_mask(valid, layer.run_lengths.view(batch, kv_heads), q_len, new_visible)
        if positions is not None:
            mask = mask & layer.window_view(positions, q_len).visible(0, q_len, keys.shape[2])
    if mask is not None and groups > 1 and mask.shape[2] > 1:
        mask = mask.repeat(1, 1, groups, 1)  # rows are (group, query)
    attend = kernel(scale)
    # 4-D inputs: with 3-D ones SDPA on CPU falls back to its math path (bmm + softmax), 1.5x slower.
    out = attend(rows, keys, values, attn_mask=mask, dropout_p=dropout, scale=scale.scaling)
    return out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()


def run_by_run(rows: torch.Tensor, layer: CompressedLayer, new_visible: torch.Tensor | None, scale: LogitScale,
               dropout: float, groups: int) -> torch.Tensor:
    """Attention over ragged runs read in place, one call per block of runs: ``[batch, kv_heads, rows, dim]``.

    A block is a sequence's consecutive KV heads holding one length (a padded batch under a uniform policy: one
    block per sequence), viewed as ``[1, heads, length, dim]`` for free and read in one SDPA call, as a layer of
    that sequence alone would be. A lone run decoding one token in float32 takes two 2-D products
    (:func:`decode_alone`): SDPA gives a lone head one CPU thread (measured in docs/performance.md). Runs see all
    their old entries and, among their newest ``q_len``, what ``new_visible`` allows."""
    q_len = rows.shape[2] // groups
    out = torch.empty_like(rows)
    for sequence, head, count, length, start in blocks(layer.lengths, layer.num_heads):
        shape = (1, count, length, layer.head_dim)
        keys = layer.keys[start : start + count * length].view(shape)
        values = layer.values[start : start + count * length].view(shape)
        mask = None
        if new_visible is not None:
            old = torch.ones(q_len, length - q_len, dtype=torch.bool, device=rows.device)
            mask = torch.cat([old, new_visible[sequence]], dim=-1)[None, None]
        if layer.positions is not None:  # a sliding window: what lies before each query's window is hidden
            positions = layer.positions[start : start + count * length].view(shape[:-1])
            sees = layer.window_view(positions, q_len).visible(0, q_len, length)
            mask = sees if mask is None else mask & sees
        if count == 1 and q_len == 1 and not dropout and rows.dtype == torch.float32:
            out[sequence, head] = decode_alone(rows[sequence, head], keys[0, 0], values[0, 0], mask, scale)
            continue
        if mask is not None and groups > 1:
            mask = mask.repeat(1, 1, groups, 1)  # rows are (group, query)
        # 4-D inputs: with 3-D ones SDPA on CPU falls back to its math path (bmm + softmax), 1.5x slower.
        out[sequence, head : head + count] = kernel(scale)(rows[sequence : sequence + 1, head : head + count], keys,
                                                           values, attn_mask=mask, dropout_p=dropout,
                                                           scale=scale.scaling)[0]
    return out


def decode_alone(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                 scale: LogitScale) -> torch.Tensor:
    """One run's attention for one decoding token, ``[groups, head_dim]``: the query heads sharing the run's
    ``[length, head_dim]`` keys and values; ``mask`` (broadcast to ``[groups, length]``) hides entries. The eager
    computation in 2-D products; float32 only, where it and SDPA agree to rounding (in bfloat16 SDPA keeps the
    logits in float32, the eager form would not), so a head computes alike alone or in a block."""
    logits = scale.apply_(torch.mm(queries, keys.T))
    if mask is not None:
        logits.masked_fill_(~mask.reshape(-1, keys.shape[0]), float("-inf"))
    return torch.mm(logits.softmax(dim=-1), values)


def blocks(lengths: list[int], heads: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(sequence, first KV head, heads, length, first entry)`` of each span of consecutive runs (storage order,
    ``heads`` runs per sequence) that belong to one sequence and hold one length."""
    start = run = 0
    while run < len(lengths):
        sequence, head = divmod(run, heads)
        count = 1
        while head + count < heads and lengths[run + count] == lengths[run]:
            count += 1
        yield sequence, head, count, lengths[run], start
        start += count * lengths[run]
        run += count


def padded_runs(layer: CompressedLayer
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys and values of a ragged packed layer as ``[batch, kv_heads, longest, head_dim]``, with ``valid``
    ``[batch, kv_heads, longest]`` and a sliding window's positions (None without): one gather per tensor. Places
    past a run's end hold the entries that follow it in storage (no zero fill): the mask hides them, and they are
    finite, so they weigh nothing. Scoring uses ``layer.dense_view()`` instead, whose padding is zeros."""
    longest = max(layer.lengths)
    lengths = layer.run_lengths
    position = torch.arange(longest, device=layer.device)
    places = ((lengths.cumsum(0) - lengths)[:, None] + position).clamp_(max=layer.keys.shape[0] - 1).flatten()
    shape = (layer.batch_size, layer.num_heads, longest, layer.head_dim)
    keys, values = (t.index_select(0, places).view(shape) for t in (layer.keys, layer.values))
    positions = None if layer.positions is None else layer.positions.index_select(0, places).view(shape[:-1])
    return keys, values, (position < lengths[:, None]).view(shape[:-1]), positions


def ragged_mask(valid: torch.Tensor, lengths: torch.Tensor, q_len: int, new_visible: torch.Tensor | None
                ) -> torch.Tensor:
    """Which padded positions each new query of each run sees: ``[batch, kv_heads, q_len, longest]`` bool, or
    ``[batch, kv_heads, 1, longest]`` for one query.

    ``valid``: ``[batch, kv_heads, longest]``, the padded view's real entries; ``lengths``: ``[batch, kv_heads]``
    entries per run, the newest ``q_len`` of them the new tokens. A query sees every old entry and, among the new
    ones, those ``new_visible`` (``[batch, q_len, q_len]``, None: causal) allows. All on the device, no host read."""
    seen = valid[:, :, None, :]
    if q_len == 1:
        return seen
    position = torch.arange(valid.shape[-1], device=valid.device)
    newness = position - (lengths - q_len)[..., None]  # [b, h, longest]: index among the new tokens, < 0 if old
    query = torch.arange(q_len, device=valid.device)[:, None]
    if new_visible is None:
        return seen & (newness[:, :, None, :] <= query)
    among_new = newness.clamp(0, q_len - 1)[:, :, None, :].expand(-1, -1, q_len, -1)
    allowed = new_visible[:, None].expand(-1, valid.shape[1], -1, -1).gather(-1, among_new)
    return seen & ((newness[:, :, None, :] < 0) | allowed)


def varlen_serves(rows: torch.Tensor) -> bool:
    """Whether torch's variable-length attention runs on ``rows``: a CUDA tensor in fp16 or bf16, a torch that has
    it (2.9 and later)."""
    if not (rows.is_cuda and rows.dtype in (torch.float16, torch.bfloat16)):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_decode(rows: torch.Tensor, layer: CompressedLayer, scale: LogitScale, dropout: float
                  ) -> torch.Tensor | None:
    """One decoding query per run through torch's variable-length flash attention, reading the packed runs in place
    (no padded copy): each run is a sequence of one KV head and its ``groups`` query heads, and the cumulative run
    lengths are the kernel's ``cu_seq_k``. Returns ``[batch, kv_heads, groups, head_dim]``, or None where the
    kernel does not serve (not CUDA, not fp16/bf16, a soft-cap, dropout, torch without it): the caller pads."""
    if not (varlen_serves(rows) and not scale.softcap and not dropout):
        return None
    from torch.nn.attention.varlen import varlen_attn
    batch, kv_heads, groups, head_dim = rows.shape
    runs = batch * kv_heads
    cu_queries = torch.arange(runs + 1, dtype=torch.int32, device=rows.device)
    cu_keys = torch.zeros(runs + 1, dtype=torch.int32, device=rows.device)
    cu_keys[1:] = layer.run_lengths.cumsum(0)
    out = varlen_attn(rows.reshape(runs, groups, head_dim), layer.keys[:, None], layer.values[:, None], cu_queries,
                      cu_keys, 1, max(layer.lengths), scale=scale.scaling, enable_gqa=True)
    return out.view(batch, kv_heads, groups, head_dim)


def kernel(scale: LogitScale) -> Callable:
    """SDPA, or for a soft-capped layer (Gemma 2; SDPA has no soft-cap) the eager computation with the same call."""
    return partial(eager_attention, softcap=scale.softcap) if scale.softcap else F.scaled_dot_product_attention


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
    scale: float, softcap: float | None,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` computed as the models' eager attention does (the logits soft-capped where
    ``softcap`` is set): in the inputs' dtype, softmax in float32."""
    logits = LogitScale(scale, softcap).apply_(query @ key.transpose(-1, -2))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    weights = logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    return F.dropout(weights, p=dropout_p, training=dropout_p > 0) @ value
