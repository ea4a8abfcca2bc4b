"""The after-prefill stage: a policy that chooses once the prompt (or its context) is in, seeing every layer at once.

Why a stage apart from ``score()``: ``score()`` runs layer by layer inside the forward pass, right after each
layer's attention, so a policy never sees two layers together and cannot run the model. Some methods need both:
one top-k across all layers and heads needs every layer's scores at once; KVzip scores entries by the attention a
second pass gives them (the model asked to repeat its context). A policy that implements
``after_prefill(prefilled)`` gets a :class:`Prefilled`: every layer's entries, the budget of each sequence, the
prompt's token ids, and :meth:`Prefilled.attention_from`, which runs the model on new tokens as if they followed the
prompt and reports the attention each cached entry receives from them, leaving the cache as it was.

When it runs. While the prompt is prefilled, such a policy's cache evicts nothing (``score()`` is not called). Before
the next forward pass (the first decoding step; or, when ``CompressedCache.context_lengths`` splits a context from
its question, the first pass past every context) a forward pre-hook on the model runs the stage, outside any layer,
so the model may run again. The stage returns scores for every compressible layer; the framework keeps, per
sequence, the budget's entries with the highest scores across all layers and heads (sinks, the recent window and
each head's newest entry first), and packs them. Everything after (the question, generated tokens) is kept whole
and not charged, as in kvpress's protocol, where presses compress at prefill only. ``CompressedCache.after_prefill()``
runs the stage by hand (a loglikelihood streamed in chunks calls it after each chunk).

Memory: the prompt is held whole until the stage runs, as the method needs it (KVzip attends over the whole context
to score it); ``kvpolicies bench`` reports the peak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvpolicies.engine.policy import ScoreInputs
from kvpolicies.engine.selection import age_order
from kvpolicies.engine.signals import Reduce

if TYPE_CHECKING:
    from kvpolicies.engine.cache import CompressedCache



@dataclass
class Prefilled:
    """What an after-prefill stage sees. Read-only, like :class:`~kvpolicies.engine.policy.ScoreInputs`."""

    layers: list[ScoreInputs | None]
    """Per layer: its entries as ``ScoreInputs`` (``keys``, ``values``, ``valid``, ``order``, ``seen_tokens``,
    ``keep``: the uniform allocation per head, ``layer``: the model facts, the policy's tracks and
    ``cumulative_attention`` if it declares them, and ``queries``, the last ``query_window`` queries of the
    prompt's forward, if it sets one), or None for a sliding-window layer held whole (a budget with
    ``windows="keep"``), which holds its window whatever the policy says. ``valid`` marks the context's entries, the
    ones to score (in a window, those the model can still attend to)."""
    budget: list[int]
    """Per sequence: entries the compressible layers may keep in all (the budget less any windows held whole)."""
    ids: torch.Tensor | None
    """``[batch, seq]`` the token ids prefilled so far, left-padded (None if the model was given embeddings)."""
    context_tokens: list[int] = field(default_factory=list)
    """Per sequence: the real tokens of the context being chosen from, the oldest first (``ids``' last
    ``seen_tokens``, less a question kept whole that follows them)."""
    first: bool = True
    """Whether this is the first stage over the prompt. False where an earlier stage cut it already (a
    log-likelihood streamed in chunks runs one after every chunk): the survivors are no longer every token, so an
    entry's age rank is not its place among the context's tokens."""
    encode: Callable[[str], list[int]] | None = None
    """Text to the model's token ids, without special tokens (a prompt of the policy's own, as KVzip's "repeat the
    context"); None where the cache was built without the tokenizer."""
    _probe: Callable[[torch.Tensor, Reduce, torch.Tensor | None], list[torch.Tensor | None]] = field(
        repr=False, default=None)

    def attention_from(self, ids: torch.Tensor, reduce: Reduce = "max",
                       mask: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Run the model on ``ids`` (``[batch, n]``; right-padded where ``mask`` is 0, so that each sequence may
        probe with its own number of tokens) as if they followed the prompt, and return per
        layer the attention each cached entry receives from them, ``[batch, kv_heads, seq]`` float32 aligned with
        ``layers[i].valid`` (None for windows held whole; a window that shares the budget reports what its entries
        would receive with the window ignored: the new tokens, past the prompt, would see few of them): the maximum (``"max"``, KVzip's reduction) or the
        sum (``"sum"``) over the new queries and the query heads sharing the KV head. The cache is left exactly as
        it was; the new tokens are not kept. Costs one forward pass of ``n`` tokens over the whole prompt. A padded
        probe needs every layer uncompressed (the stage's first run; not one that follows an earlier stage's cut)."""
        return self._probe(ids, reduce, mask)


@dataclass(frozen=True)
class SharedScores:
    """A stage's scores computed once over a prompt for several caches that would each compute the same ones:
    their policy's ``stage_ignores_budget`` says the scores follow from the prefilled entries alone, and they
    hold the same entries (one prefill, one policy config, one codec, one window rule), whatever their budgets.

    A cache given them (``CompressedCache.shared_scores``) uses them at its first stage if its :meth:`key
    <kvpolicies.engine.cache.CompressedCache.stage_key>` matches, and selects its own budget's entries from them,
    exactly as from scores of its own."""

    key: tuple
    scores: object
    """What the policy's ``after_prefill`` returned, as it returned it (each cache checks the contract itself)."""
    seconds: float
    """What computing them took (the policy's ``after_prefill``, second passes included)."""
    probe_tokens: int


def select_across_layers(scores: list[torch.Tensor], valid: list[torch.Tensor], totals: list[int],
                         sink_tokens: int | torch.Tensor = 0, window_tokens: int = 0) -> list[torch.Tensor]:
    """Keep, per sequence, ``totals[b]`` entries over all the given layers and heads: each head's newest entry
    first (no head is left empty), then its sinks and recent window, then the highest scores. Ties go to the lower
    layer, head and older entry (a stable sort), so the kept set is deterministic.

    Args:
        scores / valid: per layer ``[batch, kv_heads, seq_l]``; padding (``valid`` False) is never kept.
        totals: entries to keep per sequence (at least one per head, at most the valid entries).
        sink_tokens: one count for all, or ``[layers, batch, 1, 1]`` per layer and sequence (a sliding window past
            a sequence's start protects none there).

    Returns per layer a ``[batch, kv_heads, seq_l]`` bool mask.
    """
    longest = max(s.shape[-1] for s in scores)
    padded_valid = torch.stack([torch.nn.functional.pad(v, (0, longest - v.shape[-1]), value=False) for v in valid])
    ceiling = torch.finfo(torch.float32).max / 4  # a score of +inf still ranks below the protected entries
    ranked = torch.stack([torch.nn.functional.pad(s.float().clamp(max=ceiling), (0, longest - s.shape[-1]))
                          for s in scores])
    order = age_order(padded_valid.flatten(0, 1)).view_as(padded_valid)  # [layers, batch, heads, seq]
    count = padded_valid.sum(-1, keepdim=True)
    newest = padded_valid & (order == count - 1)
    sinks = torch.as_tensor(sink_tokens, device=order.device)  # a count, or [layers, batch, 1, 1]
    protected = padded_valid & ((order < sinks) | (order >= count - window_tokens))
    # Priority classes in one key: each head's newest entry, then sinks and window, then the scores.
    ranked = torch.where(protected, torch.finfo(torch.float32).max, ranked)
    ranked = torch.where(newest, float("inf"), ranked).masked_fill(~padded_valid, float("-inf"))
    batch = ranked.shape[1]
    flat = ranked.transpose(0, 1).reshape(batch, -1)  # [batch, layers · heads · seq]
    position = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(position)
    rank.scatter_(-1, position, torch.arange(flat.shape[-1], device=flat.device).expand_as(position))
    limit = torch.tensor(totals, device=flat.device)[:, None]
    keep = (rank < limit).view(batch, *ranked.shape[:1], *ranked.shape[2:]).transpose(0, 1) & padded_valid
    return [keep[i, ..., : s.shape[-1]] for i, s in enumerate(scores)]


def install(model) -> None:
    """Run pending after-prefill stages before each forward pass of ``model`` (idempotent)."""
    if getattr(model, "_kvpolicies_stage_hook", None) is None:
        model._kvpolicies_stage_hook = model.register_forward_pre_hook(_before_forward, with_kwargs=True)


def _before_forward(model, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not hasattr(cache, "stage_due"):  # another cache (rows decoded together call before_forward row by row)
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    new = ids if ids is not None else kwargs.get("inputs_embeds")
    if new is not None:
        before_forward(cache, model, ids, new.shape[1])


def before_forward(cache: CompressedCache, model, ids: torch.Tensor | None, new_tokens: int) -> None:
    """What ``cache`` does before a forward pass of ``new_tokens`` tokens (``ids``, None for embeddings) runs over
    it: its policy's stage if due, and the ids kept for a stage."""
    if not cache.policy.has_stage:  # no stage: nothing to do
        return
    if cache.stage_due(new_tokens):
        cache.after_prefill(model)
    cache.record_ids(ids)


def probe(cache: CompressedCache, model, ids: torch.Tensor, reduce: Reduce,
          mask: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """:meth:`Prefilled.attention_from`: run ``model`` on ``ids`` over ``cache`` and restore the cache after."""
    layers = cache.layers
    saved = [dict(vars(layer)) for layer in layers]
    for state in saved:  # tracks are the only tensors a forward may change in place
        if state.get("tracked"):
            state["tracked"] = {name: t.clone() for name, t in state["tracked"].items()}
    batch, new = ids.shape
    real = torch.ones(batch, new, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
    # Right-padded: each sequence's real tokens follow its prompt at once. Padding between them would shift a
    # sliding window, which counts places, not positions.
    if real.shape != ids.shape or not new or not bool(real[:, 0].all()) or bool((real[:, 1:] > real[:, :-1]).any()):
        raise ValueError(f"attention_from(ids, mask=...): the mask must have the ids' shape {tuple(ids.shape)} and "
                         "mark each sequence's real tokens, right-padded (its real tokens first, at least one)")
    seen = torch.tensor(layers[0].seen, device=ids.device)
    past = layers[0].logical_length
    attention_mask = torch.cat([torch.arange(past, device=ids.device) >= past - seen[:, None],  # left padding first
                                real], dim=1).long()
    positions = seen[:, None] + (real.long().cumsum(1) - 1).clamp(min=0)
    cache.probing = {"reduce": reduce, "received": {}}
    try:
        with torch.no_grad():
            model(ids, attention_mask=attention_mask, position_ids=positions, cache=cache, logits_to_keep=1)
        received = cache.probing["received"]
    finally:
        cache.probing = None
        for layer, state in zip(layers, saved):
            vars(layer).clear()
            vars(layer).update(state)
    return [received.get(i) if layer.scored else None for i, layer in enumerate(layers)]
