"""One prefill, many caches: a prompt's prefill captured once, and any policy's compressed cache derived from it.

Why this is exact. A prompt prefilled in one forward pass is cut layer by layer, each layer right after its attention
has read all of the prompt's keys (:meth:`~kvpolicies.engine.cache.CompressedCache.after_attention`): what a layer
passes on to the next was computed over the whole prompt, so the hidden states, the keys, values and queries of
every layer, and the prompt's last logits do not depend on the policy, the budget or the codec. Only what each layer
keeps does. So a :class:`Capture` runs the forward once and records, per layer, exactly what the layer's attention
handed the cache (keys and values as the layer stored them, the queries, the padding of the new tokens, the logit
scale and the attention module), and :func:`replay` feeds the same to any other cache, layer by layer, through the
same two calls the forward makes (``update`` and ``after_attention``): the cache ends where that forward would have
left it, bit for bit (tested for every policy, with codecs and an after-prefill stage).

What does not share: a prefill in chunks (eviction between chunks changes what later chunks see) and the tokens
after a cut (a question prefilled on a compressed context, decoding): those run per cache.

Memory. A capture holds every layer's keys, values and queries of the prompt at once: the model's full cache plus
``query_heads / kv_heads`` times its keys (:attr:`Prefill.nbytes`), where a compressed run peaks at one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicies.engine.cache import CompressedCache
from kvpolicies.engine.signals import LogitScale
from kvpolicies.engine.storage import CompressedLayer, claim_layer


@dataclass(frozen=True)
class LayerPass:
    """What one layer's attention handed the cache in the captured forward."""

    keys: torch.Tensor
    """``[batch, kv_heads, seq, head_dim]``, as ``update()`` received them."""
    values: torch.Tensor
    query: torch.Tensor
    """``[batch, heads, seq, head_dim]``."""
    new_valid: torch.Tensor | None
    """``[batch, seq]`` which new tokens are real (None: all of them)."""
    scale: LogitScale
    module: torch.nn.Module | None


@dataclass(frozen=True)
class Prefill:
    """A captured prefill: per layer what its attention handed over, the prompt's ids and its last logits."""

    passes: tuple[LayerPass, ...]
    ids: torch.Tensor | None
    logits: torch.Tensor | None = None
    """``[batch, 1, vocab]``: the logits of the prompt's last position, as the forward returned them (None when
    ``generate`` ran the forward: then ``sequence`` holds its first token)."""
    sequence: torch.Tensor | None = None
    """``[batch, seq + 1]``: the prompt and the first token ``generate`` chose from it (None for a plain forward)."""

    @property
    def nbytes(self) -> int:
        """Bytes the capture holds (keys, values and queries of every layer, the logits)."""
        tensors = [t for p in self.passes for t in (p.keys, p.values, p.query, p.new_valid, self.logits)
                   if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class Capture(CompressedCache):
    """A cache that keeps every entry (the full cache) and records what each layer's attention hands over."""

    def __init__(self, model) -> None:
        super().__init__(model, "full", 1.0)
        self.passes: dict[int, LayerPass] = {}

    def after_attention(self, layer: CompressedLayer, query: torch.Tensor, new_valid: torch.Tensor | None,
                        scale: LogitScale, module: torch.nn.Module | None = None) -> None:
        if layer.layer_idx in self.passes:
            raise RuntimeError("a Capture records one forward pass; build a new one for the next prompt")
        self.passes[layer.layer_idx] = LayerPass(layer.keys, layer.values, query, new_valid, scale, module)
        super().after_attention(layer, query, new_valid, scale, module)

    def prefill(self, sequence: torch.Tensor) -> Prefill:
        """What ``generate`` recorded here in one forward pass (``max_new_tokens=1``), whose output is ``sequence``
        (the prompt and its first token)."""
        self._check()
        return Prefill(self._passes(), sequence[:, :-1], sequence=sequence)

    def _passes(self) -> tuple[LayerPass, ...]:
        return tuple(self.passes[i] for i in range(len(self.layers)))

    def _check(self) -> None:
        if len(self.passes) != len(self.layers):
            raise RuntimeError(f"the forward pass reached {len(self.passes)} of {len(self.layers)} layers through "
                               "the kvpolicies attention; this model cannot share its prefill")


@torch.no_grad()
def capture(model, ids: torch.Tensor, **forward: object) -> Prefill:
    """Prefill ``ids`` (``[batch, seq]``) once through ``model`` with the keyword arguments of the forward being
    shared (``attention_mask``, ``position_ids``, ...), recording every layer's pass."""
    cache = Capture(model)
    output = model(ids, cache=cache, logits_to_keep=1, **forward)
    cache._check()
    return Prefill(cache._passes(), ids, output.logits)


def replay(prefill: Prefill, cache: CompressedCache) -> None:
    """Bring ``cache`` (new, any policy, budget and codec, built for the same model) to where the captured forward
    would have left it: every layer updated with the captured keys and values and cut by its own policy, the
    prompt's ids recorded for an after-prefill stage. Its ``context_lengths`` must be set as for that forward."""
    if cache.layers[0].is_initialized:
        raise ValueError("replay() starts from an empty cache: build a new one for each replay")
    if len(cache.layers) != len(prefill.passes):
        raise ValueError(f"the prefill has {len(prefill.passes)} layers and the cache {len(cache.layers)}: replay it "
                         "into a cache of the model that captured it")
    cache.record_ids(prefill.ids)  # what the stage hook records before the forward
    for index, captured in enumerate(prefill.passes):
        keys, _ = cache.update(captured.keys, captured.values, index)
        claim_layer(keys)  # the hand-over slot the attention would have emptied
        cache.after_attention(cache.layers[index], captured.query, captured.new_valid, captured.scale,
                              captured.module)
