"""Which kind of cache each decoder layer of a model needs, read the way transformers reads it.

kvpolicies stores two kinds of layer: full attention (every past token; the policy compresses it) and sliding
window (the model attends only to its last ``W`` tokens, so its own cache keeps the last ``W - 1``; kvpolicies keeps
at most those, fewer when the budget lets the windows share it). Anything else — linear attention, state-space or convolution states, chunked
attention, layers that reuse another layer's cache — holds something other than one key and value per past token,
so evicting "entries" has no meaning there. Such a model is refused here, by name and layer kind, before it produces
a single number.

The layer kinds come from transformers' own ``get_layer_types_and_kwargs``, which ``DynamicCache`` also uses: a
model whose config sets ``sliding_window`` without ``layer_types`` (Mistral) is windowed on every layer, exactly
as transformers treats it.
"""

from __future__ import annotations

from transformers.cache_utils import get_layer_types_and_kwargs

from kvpolicies.errors import ModelLoadError

FULL = "full_attention"
SLIDING = "sliding_attention"

WHAT_IS_MISSING = {
    "linear_attention": "a linear-attention state instead of per-token keys and values",
    "conv": "a convolution state instead of per-token keys and values",
    "mamba": "a state-space (Mamba) state instead of per-token keys and values",
    "hybrid": "a recurrent state next to its attention",
    "hybrid_sliding": "a recurrent state next to its attention",
    "chunked_attention": "chunked attention (each chunk attends only within itself), which kvpolicies does not mask",
    "dummy": "no cache of its own (it reuses another layer's keys and values, or has no attention)",
    "indexed_attention": "a sparse-attention indexer cache next to its keys and values",
}


def layer_windows(model) -> tuple[int | None, ...]:
    """Per decoder layer: None for full attention, or the window ``W`` of a sliding-window layer.

    Raises :class:`ModelLoadError` naming the model and the layer kinds kvpolicies cannot store.
    """
    name = type(model).__name__
    config = model.config.get_text_config(decoder=True)
    if not getattr(config, "num_attention_heads", None):
        raise ModelLoadError(f"{name} has no attention heads (config {type(config).__name__}); kvpolicies evicts "
                             "entries of an attention KV cache, which this model does not have")
    if getattr(config, "kv_lora_rank", None):
        raise ModelLoadError(f"{name} is not supported: it uses multi-head latent attention (kv_lora_rank="
                             f"{config.kv_lora_rank}), whose cached keys and values differ in width and position "
                             "encoding from one key and value per head, which kvpolicies counts and evicts")
    try:
        types, kwargs = get_layer_types_and_kwargs(config)
    except Exception as error:  # a config transformers itself cannot lay out
        raise ModelLoadError(f"{name}: cannot read which cache each layer needs ({error})") from None
    unsupported = sorted({kind for kind in types if kind not in (FULL, SLIDING)})
    if unsupported:
        reasons = "; ".join(f"{kind!r}: {WHAT_IS_MISSING.get(kind, 'a cache layout other than keys and values')}"
                            for kind in unsupported)
        raise ModelLoadError(
            f"{name} is not supported: kvpolicies stores full-attention and sliding-window layers only, and this "
            f"model also has {unsupported} layers ({reasons})"
        )
    windows = []
    for kind, options in zip(types, kwargs):
        window = options.get("sliding_window") if kind == SLIDING else None
        if kind == SLIDING and (not isinstance(window, int) or window < 2):
            raise ModelLoadError(f"{name}: a sliding-window layer with window {window!r}; expected a whole number "
                                 "of tokens >= 2")
        windows.append(window)
    if len(windows) != config.num_hidden_layers:
        raise ModelLoadError(f"{name}: {len(windows)} layer kinds for {config.num_hidden_layers} decoder layers")
    return tuple(windows)
