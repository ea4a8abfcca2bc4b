"""Signals computed on demand for policies that declare them (see :class:`kvpolicies.Signal`), and tracks: per-entry
quantities the cache keeps up to date at every forward pass (see :class:`Track`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

Reduce = Literal["sum", "max"]


@dataclass(frozen=True)
class LogitScale:
    """How a layer turns ``q·k`` into attention logits, as the model does it: times ``scaling`` (``head_dim ** -0.5``
    unless the model says otherwise, e.g. Gemma's ``query_pre_attn_scalar``), then, when ``softcap`` is set
    (Gemma 2), squashed into ``±softcap`` by ``softcap · tanh(logit / softcap)``."""

    scaling: float
    softcap: float | None = None

    def apply_(self, dots: torch.Tensor) -> torch.Tensor:
        """Turn ``dots`` into logits in place, and return them."""
        dots.mul_(self.scaling)
        if self.softcap:
            dots.div_(self.softcap).tanh_().mul_(self.softcap)
        return dots


@dataclass(frozen=True)
class SlidingWindow:
    """What a sliding-window layer's queries can see once its entries are evicted and packed: each entry's position
    in the sequence, since age order no longer tells how far back an entry lies. Query at position ``p`` sees the
    entries at positions ``p - size + 1`` to ``p`` (the model's own window)."""

    positions: torch.Tensor
    """``[batch, kv_heads, seq]`` integer position of each entry (padding positions count, as in the model's mask)."""
    first_query: int
    """Position of the first query of the pass; the others follow it."""
    size: int
    """The model's window ``W``."""

    def visible(self, start: int, stop: int, seen: int) -> torch.Tensor:
        """``[batch, kv_heads, stop - start, seen]``: which of the first ``seen`` entries queries ``start`` to
        ``stop`` of the pass can see through the window (causality is the caller's)."""
        oldest = torch.arange(start, stop, device=self.positions.device) + (self.first_query - self.size + 1)
        return self.positions[:, :, None, :seen] >= oldest[:, None]


def attention_received(
    query: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    order: torch.Tensor,
    scaling: float | LogitScale,
    chunk: int = 256,
    reduce: str = "sum",
    window: SlidingWindow | None = None,
) -> torch.Tensor:
    """Attention each cached entry receives from ``query``, summed over its query heads and the queries (or their
    maximum, with ``reduce="max"``).

    Args:
        query: ``[batch, heads, q_len, head_dim]``; the queries belong to the newest ``q_len`` entries.
        keys: ``[batch, kv_heads, seq, head_dim]``.
        valid / order: ``[batch, kv_heads, seq]`` padding mask and age rank (see ``selection.age_order``).
        scaling: the layer's logit scale, or a :class:`LogitScale` with its soft-cap.
        window: for a sliding-window layer, what each query sees through the window (None: everything older).

    Returns:
        ``[batch, kv_heads, seq]`` float32. Query ``j`` sees the entries whose age rank is at most
        ``count - q_len + j`` (causality in age order, so dense and packed layouts agree). Queries run in chunks of
        ``chunk`` so memory stays O(chunk × seq) instead of O(q_len × seq).
    """
    logit_scale = scaling if isinstance(scaling, LogitScale) else LogitScale(scaling)
    batch, kv_heads, seq, head_dim = keys.shape
    heads, q_len = query.shape[1], query.shape[2]
    grouped = query.view(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    first_new = valid.sum(-1, keepdim=True) - q_len  # [batch, kv_heads, 1]
    received = torch.zeros(batch, kv_heads, seq, dtype=torch.float32, device=keys.device)
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        seen = _visible_prefix(seq, q_len, stop)
        logits = _dots(grouped[:, :, :, start:stop].float(), keys[:, :, :seen])
        limit = first_new + torch.arange(start, stop, device=keys.device)  # [batch, kv_heads, chunk]
        visible = valid[:, :, None, :seen] & (order[:, :, None, :seen] <= limit[..., None])
        if window is not None:
            visible = visible & window.visible(start, stop, seen)
        probs = logit_scale.apply_(logits).masked_fill_(~visible[:, :, None], float("-inf")).softmax(dim=-1)
        probs = probs.nan_to_num_(0.0)
        if reduce == "max":
            received[..., :seen] = torch.maximum(received[..., :seen], probs.amax(dim=(2, 3)))
        else:
            received[..., :seen] += probs.sum(dim=(2, 3))
    return received


KEY_BLOCK = 4096
"""Keys upcast to float32 at a time when they are stored in a narrower dtype (bf16, fp16)."""


def _dots(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``q·k`` in float32: ``[batch, kv_heads, groups, q, seq]`` from float32 ``query`` ``[b, h, g, q, d]`` and
    ``keys`` ``[b, h, seq, d]`` of any float dtype.

    Narrower keys are upcast ``KEY_BLOCK`` at a time, never all at once: a float32 copy of a layer's keys would
    double their memory at every scoring. The products are the same float32 dot products either way.
    """
    if keys.dtype == torch.float32:
        return torch.einsum("bhgqd,bhsd->bhgqs", query, keys)
    batch, kv_heads, groups, q_len, _ = query.shape
    dots = torch.empty(batch, kv_heads, groups, q_len, keys.shape[2], dtype=torch.float32, device=keys.device)
    for start in range(0, keys.shape[2], KEY_BLOCK):
        block = keys[:, :, start : start + KEY_BLOCK].float()
        dots[..., start : start + block.shape[2]] = torch.einsum("bhgqd,bhsd->bhgqs", query, block)
    return dots


def _visible_prefix(seq: int, q_len: int, stop: int) -> int:
    """How many leading storage positions the queries before ``stop`` can see, in any sequence or head: known on the
    host, with no look at the device.

    Causality hides every entry younger than the chunk's last query: at prefill, the keys of later chunks. Cutting
    them before q·Kᵀ halves the work of a long prompt (a triangle instead of a square); entries past the cut are
    invisible to every query of the chunk, so the result is unchanged. Why the cut holds: entries are stored in age
    order, so an entry with ``n`` real entries newer than it sits at least ``n`` places before the end; query
    ``j < stop`` sees the entries of age rank up to ``count - q_len + j``, each with at least ``q_len - stop``
    newer ones, all of them before position ``seq - q_len + stop``.
    """
    return max(0, min(seq, seq - q_len + stop))


class Track:
    """A per-entry quantity the cache accumulates at every forward pass of every layer the policy scores, stored beside
    keys and values and carried with them through appends, packing and eviction. A policy lists the tracks its
    ``score()`` reads in ``Policy.tracks`` and reads them as ``inputs.tracks[name]`` (``[batch, kv_heads, seq]``
    float32). Why a track and not a signal: what an entry received at earlier steps is gone by the time a policy
    scores; only something kept beside the entry remembers it.

    Subclass it, set ``name`` (unique among a policy's tracks) and ``reduce``, and implement :meth:`update`.
    """

    name: ClassVar[str] = ""
    reduce: ClassVar[Reduce] = "sum"
    """How the attention an entry receives in one forward pass is reduced over the query heads that share its KV
    head and over the pass's queries: ``"sum"`` or ``"max"``."""

    def update(self, held: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """The entries' new values from their ``held`` values and the attention ``received`` in this forward pass
        (float32, same shape). Elementwise: the layout (dense, packed runs) is the cache's business. Entries arrive
        with 0 held, before their first update."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class CumulativeAttention(Track):
    """The attention an entry has received from every query since it entered the cache: ``CUMULATIVE_ATTENTION``."""

    name = "cumulative_attention"

    def update(self, held: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        return held.add_(received)
